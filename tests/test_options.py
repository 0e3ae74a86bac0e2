"""Pass spellings, option validation, JSON round-trips, recipe files and the registry."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lowc.errors import PassOptionError
from lowc.backends import registry  # every pass: the passes layer's and each backend's
from lowc.passes import registry as pass_registry
from lowc.passes.cleanup import RemoveDead
from lowc.backends.registry import build_pass, load_recipe, parse_pass
from lowc.backends.registry import pass_from_json as from_json
from lowc.passes.options import parse_spelling
from lowc.passes.quant.activations import QuantizeActivations
from lowc.passes.quant.rtn import RTN

# ---- spelling parser -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling, expected",
    [
        ("rtn", RTN()),
        ("  rtn  ", RTN()),
        ("rtn{}", RTN()),
        ("rtn{bits=4,group_size=128,symmetric=false,ignore=lm_head}", RTN(bits=4, group_size=128, symmetric=False, ignore=("lm_head",))),
        ("rtn{ignore=[lm_head,mlp.down_proj]}", RTN(ignore=("lm_head", "mlp.down_proj"))),
        ("rtn{ignore=[]}", RTN(ignore=())),
        ('rtn{ignore=["a,b", "model.layers.0.*"]}', RTN(ignore=("a,b", "model.layers.0.*"))),
        ("rtn{ignore='x y'}", RTN(ignore=("x y",))),
        ("rtn{bits=4, group_size=64}", RTN(bits=4, group_size=64)),
        ("rtn{ bits = 3 , group_size = -1 , ignore = [ a , b ] }", RTN(bits=3, group_size=-1, ignore=("a", "b"))),
        ("rtn {symmetric=TRUE}", RTN(symmetric=True)),
        ("rtn{bits=none}", RTN()),
        ("quantize-activations{bits=8}", QuantizeActivations(bits=8)),
        ("remove-dead", RemoveDead()),
    ],
)
def test_parse_pass(spelling, expected):
    p = parse_pass(spelling)
    assert type(p) is type(expected)
    assert p == expected


def test_parse_spelling_raw_values():
    assert parse_spelling("rtn{bits=4,ignore=[a,\"b c\"]}") == ("rtn", {"bits": "4", "ignore": ["a", "b c"]})


@pytest.mark.parametrize(
    "spelling, match",
    [
        ("rnt", r"unknown pass 'rnt' \(did you mean 'rtn'\?\)"),
        ("quantize-activation", r"did you mean 'quantize-activations'"),
        ("zzzz", r"unknown pass 'zzzz'; known passes: .*rtn"),
        ("rtn{bitz=4}", r"pass 'rtn': unknown option\(s\) bitz \(options: bits, group_size, symmetric, ignore, layer_bits\)"),
        ("rtn{bits=four}", r"pass 'rtn' option bits: expected an integer, got 'four'"),
        ("rtn{bits=4.5}", r"pass 'rtn' option bits: expected an integer"),
        ("rtn{symmetric=maybe}", r"pass 'rtn' option symmetric: expected true/false"),
        ("rtn{ignore=[a,[b]]}", r"pass 'rtn' option ignore: expected a string"),
        ("rtn{bits=9}", r"pass 'rtn': bits=9 cannot be packed"),
        ("rtn{bits=0}", r"pass 'rtn': bits=0 cannot be packed: choose 1..8"),
        ("rtn{group_size=100}", r"pass 'rtn': group_size=100 cannot be packed: use -1"),
        ("rtn{group_size=0}", r"pass 'rtn': group_size=0"),
        ("quantize-activations{bits=16}", r"pass 'quantize-activations': bits=16"),
        ("rtn{bits=4", r"bad pass spelling 'rtn\{bits=4'"),
        ("rtn{ignore=[a,b}", r"unterminated list"),
        ('rtn{ignore="abc}', r"unterminated string"),
        ("rtn{bits=4,bits=5}", r"option 'bits' given twice"),
        ("rtn{bits 4}", r"expected key=value"),
        ("rtn{=4}", r"expected key=value"),
        ("rtn{bits=4 group_size=8}", r"pass 'rtn' option bits: expected an integer, got '4 group_size=8'"),
        ("{bits=4}", r"bad pass spelling"),
        ("", r"bad pass spelling"),
    ],
)
def test_bad_spellings(spelling, match):
    with pytest.raises(PassOptionError, match=match):
        parse_pass(spelling)


def test_direct_construction_validates():
    with pytest.raises(PassOptionError, match="pass 'rtn': bits=9"):
        RTN(bits=9)
    with pytest.raises(PassOptionError, match="pass 'rtn': group_size=12"):
        RTN(group_size=12)


# ---- JSON and spelling round-trips -----------------------------------------------------------------

NON_DEFAULT = {
    "rtn": {"bits": 3, "group_size": -1, "symmetric": True, "ignore": ("lm_head", "model.layers.0.*", "a,b", "x y")},
    "quantize-activations": {"bits": 4, "static": True, "observer": "percentile", "percentile": 99.9},
    "quantize-kv": {"bits": 4, "group_size": 16, "symmetric": True, "tensors": ("k",), "ignore": ("model.layers.0.*",)},
    "smoothquant": {"alpha": 0.75, "ignore": ("lm_head", "mlp.*")},
    "gptq": {"bits": 3, "group_size": 64, "symmetric": True, "ignore": ("lm_head",), "act_order": True,
             "damp": 0.05, "block_size": 64, "true_sequential": False},
    "affinequant": {"bits": 3, "group_size": 64, "symmetric": True, "ignore": ("lm_head",), "epochs": 5, "lr": 0.001,
                    "lwc_lr": 0.02, "alpha": 0.75, "sf": 0.05, "lwc": False, "ln_matrix": False, "aug_loss": True,
                    "batch_size": 2},
    "flatquant": {"bits": 3, "group_size": -1, "symmetric": True, "ignore": ("lm_head", "mlp.*"), "epochs": 4, "lr": 0.001,
                  "alpha": 0.5, "lwc": False, "lac": False, "batch_size": 2, "gptq": True},
    "prune": {"method": "sparsegpt", "pattern": "4:8", "sparsity": 0.5, "bits": 3, "group_size": 64, "symmetric": True,
              "ignore": ("lm_head", "mlp.*"), "damp": 0.05, "block_size": 64},
    "gqsa": {"sparsity": 0.25, "sparse_group": 32, "bits": 3, "group_size": 64, "symmetric": True, "ignore": ("lm_head",),
             "salience": "wanda", "epochs": 1, "lr": 0.005, "weight_lr": 0.0001, "train_weights": False,
             "e2e_epochs": 0, "e2e_lr": 0.002, "damp": 0.05, "batch_size": 2},
    "remove-dead": {},
    "lut-lower": {},
    "lut-head": {"bits": 3, "group_size": 32, "symmetric": True, "ignore": ("x",), "layers": ("lm_head", "out*")},
    "linearize": {"method": "hedgehog", "layers": ("0", "model.layers.1*"), "feature_dim": 16, "window": 0,
                  "kv_head_maps": True, "epochs": 3, "lr": 0.005, "lora_rank": 4, "lora_alpha": 8.0,
                  "lora_lr": 0.0002, "lora_epochs": 1, "lora_loss": "distill"},
    "distill_ssm": {"layers": ("0", "model.layers.1*"), "stages": (1, 3), "epochs": (1, 2, 3), "lr": (0.01, 0.001, 0.0001),
                    "kernel": 2, "chunk": 32},
    "triton-lower": {},
    "onnx-check": {},
    "onnx-lower": {"matmulnbits": True, "accuracy_level": 4},
    "densify-sparse": {},
}


def test_each_layer_registers_its_own_passes():
    """The passes layer names none of the backends' modules; each backend package lists its own
    passes; the registry of everything is their union, with no name twice."""
    assert not [spec for spec in pass_registry.PASSES.values() if spec.startswith("lowc.backends.")]
    backend = {name: spec for mod in registry.BACKENDS for name, spec in __import__(mod, fromlist=["PASSES"]).PASSES.items()}
    assert all(spec.startswith("lowc.backends.") for spec in backend.values())
    assert set(registry.pass_table()) == set(pass_registry.PASSES) | set(backend)
    assert not set(pass_registry.PASSES) & set(backend)


def _instances():
    for name, cls in registry.all_passes().items():
        yield cls()
        yield cls(**NON_DEFAULT[name])


def test_every_pass_has_non_default_options_here():
    assert set(NON_DEFAULT) == set(registry.pass_table())


@pytest.mark.parametrize("p", list(_instances()), ids=lambda p: p.spelling())
def test_json_round_trip(p):
    d = json.loads(json.dumps(p.to_json()))
    assert d["name"] == p.name
    q = from_json(d)
    assert type(q) is type(p) and q == p


@pytest.mark.parametrize("p", list(_instances()), ids=lambda p: p.spelling())
def test_spelling_round_trip(p):
    s = p.spelling()
    assert s.startswith(p.name)
    assert parse_pass(s) == p


def test_spelling_lists_only_non_defaults():
    assert RTN().spelling() == "rtn"
    assert RTN(bits=4).spelling() == "rtn{bits=4}"
    assert RTN(symmetric=False, ignore=()).spelling() == "rtn{symmetric=false,ignore=[]}"


def test_options_have_docs():
    for name, cls in registry.all_passes().items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{name}.{f.name} has no doc"
        assert cls.summary, name


def test_registry_names_equal_class_names():
    passes = registry.all_passes()
    assert set(passes) == set(registry.pass_table())
    for name, cls in passes.items():
        assert cls.name == name


# ---- recipes -------------------------------------------------------------------------------------

EXPECTED = [RTN(bits=4, group_size=64, ignore=("lm_head", "mlp.down_proj")), QuantizeActivations(bits=8), RemoveDead()]

GOOD_RECIPES = {
    "spellings.yaml": "- rtn{bits=4,group_size=64,ignore=[lm_head,mlp.down_proj]}\n- quantize-activations{bits=8}\n- remove-dead\n",
    "mappings.yml": (
        "- name: rtn\n  bits: 4\n  group_size: 64\n  ignore: [lm_head, mlp.down_proj]\n"
        "- quantize-activations: {bits: 8}\n"
        "- remove-dead:\n"
    ),
    "options.yaml": (
        "passes:\n"
        "  - name: rtn\n    options: {bits: 4, group_size: 64, ignore: [lm_head, mlp.down_proj]}\n"
        "  - {name: quantize-activations, bits: 8}\n"
        "  - remove-dead\n"
    ),
    "spellings.json": json.dumps(["rtn{bits=4,group_size=64,ignore=[lm_head,mlp.down_proj]}", "quantize-activations{bits=8}", "remove-dead"]),
    "passes.json": json.dumps({"passes": [
        {"name": "rtn", "options": {"bits": 4, "group_size": 64, "ignore": ["lm_head", "mlp.down_proj"]}},
        {"quantize-activations": {"bits": 8}},
        "remove-dead",
    ]}),
}


@pytest.mark.parametrize("fname", sorted(GOOD_RECIPES))
def test_recipe_files(tmp_path, fname):
    path = tmp_path / fname
    path.write_text(GOOD_RECIPES[fname])
    assert load_recipe(str(path)) == EXPECTED


@pytest.mark.parametrize(
    "fname, text, match",
    [
        ("scalar.yaml", "rtn\n", r"expected a list of passes"),
        ("mapping.yaml", "rtn: {bits: 4}\n", r"expected a list of passes"),
        ("broken.yaml", "- rtn{bits=4\n- [unclosed\n", r"cannot parse"),
        ("broken.json", '["rtn",', r"cannot parse"),
        ("number.yaml", "- 4\n", r"each recipe item must be a pass spelling or a mapping, got 4"),
        ("two_keys.yaml", "- {rtn: {bits: 4}, remove-dead: {}}\n", r"each recipe item must be"),
        ("unknown.yaml", "- rtm\n", r"unknown pass 'rtm' \(did you mean 'rtn'\?\)"),
        ("badopt.yaml", "- {name: rtn, bits: 9}\n", r"pass 'rtn': bits=9"),
        ("badtype.json", '[{"name": "rtn", "options": {"symmetric": "perhaps"}}]', r"pass 'rtn' option symmetric"),
        ("unknownopt.yaml", "- rtn: {bitz: 4}\n", r"unknown option\(s\) bitz"),
    ],
)
def test_bad_recipes(tmp_path, fname, text, match):
    path = tmp_path / fname
    path.write_text(text)
    with pytest.raises(PassOptionError, match=match):
        load_recipe(str(path))


def test_missing_recipe(tmp_path):
    with pytest.raises(PassOptionError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))


def test_build_pass_takes_typed_values():
    assert build_pass("rtn", {"bits": 4, "symmetric": True, "ignore": ["a"]}) == RTN(bits=4, symmetric=True, ignore=("a",))
    with pytest.raises(PassOptionError, match="expected an integer"):
        build_pass("rtn", {"bits": True})
