"""``remove-dead``: erase unused nodes and attributes no node reads (keeps the no-orphan invariant
and the artifact free of weights the graph does not use)."""

from __future__ import annotations

from dataclasses import dataclass

from lowc.passes.base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class RemoveDead(Pass):
    name = "remove-dead"
    summary = "erase unused nodes and the parameters/buffers no node reads"

    def run(self, program, ctx: PassContext) -> PassResult:
        before = len(program.graph.nodes)
        program.graph.eliminate_dead_code()
        removed = program.remove_dead()
        nodes = before - len(program.graph.nodes)
        return PassResult(changed=bool(nodes or removed), stats={"nodes_removed": nodes, "removed": removed})
