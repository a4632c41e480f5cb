"""Forward-time capture of layer inputs and output-gradient edges, and the graph safety check.

The fast engine runs one forward pass with hooks on the modules that own trainable parameters,
then one backward pass that asks autograd only for the gradients of those modules' outputs. The
per-example parameter gradients are rebuilt from the stored inputs and those output gradients.
That is exact only if every trainable parameter reaches the loss *solely* through the forward of
the module that owns it; :func:`check_graph` verifies this on the autograd graph of every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten


@dataclass
class Record:
    """What one forward call of a hooked module left behind.

    Attributes:
        args: Positional inputs of the call (tensors kept by reference).
        kwargs: Keyword inputs of the call.
        leaf_index: Positions, in the flattened output, of the tensors that need a gradient.
        edges: Autograd edges of those output tensors, taken at forward time so that a later
            in-place operation on the output does not change what they refer to.
        leaf_meta: ``(shape, dtype, device)`` of those outputs (to fill an unused output's grad).
        versions: ``(tensor, version)`` of every tensor input, to detect in-place changes.
        extra: Rule-specific data captured during the call (e.g. the convolution it ran).
        grads: Gradients of the loss with respect to the outputs, filled after backward.
        shared: The call's inputs were shared by all examples (leading size 1) and were
            expanded to one row per example, as was its output.
    """

    args: tuple
    kwargs: dict
    leaf_index: list[int]
    edges: list[GradientEdge]
    leaf_meta: list[tuple]
    versions: list[tuple[torch.Tensor, int]]
    extra: Any = None
    grads: list[torch.Tensor] = field(default_factory=list)
    shared: bool = False


# Autograd nodes through which a per-example copy of shared data may reach the loss: a sum or
# difference with another tensor of the graph (BERT adds position embeddings to the token
# embeddings), where row i of the result depends on row i of the copy only, so the gradient of
# row i is example i's own. Anything else is refused: indexing or a reduction over the batch
# would pour several examples' gradients into one row, and a product or a sum with a constant
# would leave the rows mere copies that a later operation could still mix.
BROADCAST_CONSUMERS = frozenset({"AddBackward0", "SubBackward0"})


def is_shared_call(args: tuple, kwargs: dict, output: Any) -> bool:
    """Whether a call ran on data shared by the whole batch: output and every tensor input of
    rank >= 1 have leading size 1 (at least one such input)."""
    if not isinstance(output, torch.Tensor) or output.dim() == 0 or output.shape[0] != 1:
        return False
    inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    ranked = [t for t in inputs if t.dim() > 0]
    return bool(ranked) and all(t.shape[0] == 1 for t in ranked)


def expand_rows(tree: Any, n: int) -> Any:
    """Expands every tensor of rank >= 1 in ``tree`` from leading size 1 to ``n`` (a view)."""
    leaves, spec = tree_flatten(tree)
    out = [
        t.expand(n, *t.shape[1:]) if isinstance(t, torch.Tensor) and t.dim() > 0 else t
        for t in leaves
    ]
    return spec.unflatten(out)


def make_record(
    args: tuple, kwargs: dict, output: Any, extra: Any = None, shared: bool = False
) -> Record:
    """Builds a :class:`Record` from a module call's inputs and output."""
    leaves = [output] if isinstance(output, torch.Tensor) else tree_flatten(output)[0]
    index, edges, like = [], [], []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
            index.append(i)
            edges.append(get_gradient_edge(leaf))
            like.append((leaf.shape, leaf.dtype, leaf.device))
    flat = not kwargs and all(isinstance(a, torch.Tensor) for a in args)
    in_leaves = args if flat else tree_flatten((args, kwargs))[0]
    # torch exposes a tensor's in-place version counter only as `_version`.
    versions = [(t, t._version) for t in in_leaves if isinstance(t, torch.Tensor)]  # noqa: SLF001
    return Record(tuple(args), dict(kwargs), index, edges, like, versions, extra, shared=shared)


def check_unchanged(record: Record, name: str) -> None:
    """Raises if an input of a recorded call was modified in place after the call.

    Raises:
        ValueError: naming the module; the stored activation would no longer be its input.
    """
    for tensor, version in record.versions:
        if tensor._version != version:  # noqa: SLF001 (torch's version counter)
            raise ValueError(
                f"the input of module {name!r} was modified in place after its forward call; "
                "the fast engine needs it unchanged: use inplace=False in the layer that "
                "follows it, or engine='vmap'"
            )


def _input_nodes(record: Record) -> list:
    # record.versions lists every tensor among the call's (flattened) inputs.
    return [t.grad_fn for t, _ in record.versions if t.grad_fn is not None]


def check_graph(
    loss: torch.Tensor,
    records: list[tuple[str, Record]],
    params: list[torch.nn.Parameter] | frozenset[int],
    names: dict[int, str],
) -> list[bool]:
    """Checks that trainable parameters reach ``loss`` only through recorded module calls, and
    says which records are sources (:func:`source_records`), from one walk of the graph.

    Walks the autograd graph from ``loss``. The node that produced a recorded output is not
    expanded; the walk continues from that call's inputs instead. Reaching a trainable
    parameter's accumulator anyway means it is used outside its module's forward (weight tying,
    a parent using ``child.weight`` functionally, an unhooked call), whose contribution the fast
    engine would silently drop. The walk is depth first and notes, for each node it leaves,
    whether a recorded output node lies at or below it, which is what :func:`source_records`
    asks of the records' inputs (those the walk from ``loss`` does not reach are walked after).

    Args:
        loss: The scalar whose graph is walked.
        records: ``(module name, record)`` pairs of the call.
        params: The trainable parameters, or the frozenset of their ``id``s (an engine forms
            it once).
        names: Parameter names by ``id``, for the error message.

    Returns:
        For each record, whether it is a source (as :func:`source_records`).

    Raises:
        ValueError: naming the parameter and saying what to do.
    """
    wanted = params if isinstance(params, frozenset) else frozenset(id(p) for p in params)
    cuts: dict[Any, list] = {}
    shared: dict[Any, str] = {}
    inputs = [_input_nodes(record) for _, record in records]
    for (name, record), nodes in zip(records, inputs):
        for edge in record.edges:
            cuts.setdefault(edge.node, []).extend(nodes)
            if record.shared:
                shared[edge.node] = name
    reach: dict[Any, bool] = {}  # node -> whether a recorded output node lies at or below it
    _walk([loss.grad_fn] if loss.grad_fn is not None else [], cuts, reach, wanted, shared, names)
    return _sources(inputs, cuts, reach)


def _walk(starts, cuts, reach, wanted=None, shared=None, names=None) -> None:
    """Depth-first walk from ``starts``, filling ``reach`` for every node it leaves.

    With ``wanted`` (ids of trainable parameters) it is the check of :func:`check_graph`: a cut
    (recorded output) node is not expanded, the walk goes on from its call's inputs (``cuts``);
    without, it stops at cut nodes (what :func:`source_records` needs below a record's inputs).
    """
    # Python-level operations kept few (this runs every step): no generators, one lookup each.
    expanding: dict[Any, list] = {}  # node -> its children, while the walk is below it
    stack = [(node, False) for node in starts]
    pop, push = stack.pop, stack.append
    while stack:
        node, leaving = pop()
        if leaving:
            # every child was left before its parent (a DAG), so each has its entry in reach
            reach[node] = any(map(reach.__getitem__, expanding.pop(node)))
            continue
        if node is None or node in reach or node in expanding:
            continue
        next_functions = node.next_functions
        if shared and any(fn in shared for fn, _ in next_functions):
            mixes = all(fn is not None for fn, _ in next_functions)
            if type(node).__name__ not in BROADCAST_CONSUMERS or not mixes:
                fn = next(fn for fn, _ in next_functions if fn in shared)
                raise ValueError(
                    f"module {shared[fn]!r} ran on data shared by all examples (leading size 1) "
                    f"and its output reaches the loss through {type(node).__name__}, not by being "
                    "added to another tensor of the graph (+ or -); the fast engine cannot "
                    "attribute its gradient to examples: use engine='vmap'"
                )
        if node in cuts:
            reach[node] = True
            if wanted is not None:
                stack += [(child, False) for child in cuts[node]]
            continue
        if wanted is not None:
            variable = getattr(node, "variable", None)
            if variable is not None and id(variable) in wanted:
                raise ValueError(
                    f"parameter {names.get(id(variable), '?')!r} reaches the loss outside the "
                    "forward of the module that owns it (weight tying, or a functional use such "
                    "as F.linear(x, layer.weight)); the fast engine cannot see that use: use "
                    "engine='vmap', or untie the parameter"
                )
        children = [fn for fn, _ in next_functions if fn is not None]
        expanding[node] = children
        push((node, True))
        stack += [(child, False) for child in children if child not in reach]


def _sources(inputs, cuts, reach) -> list[bool]:
    """For each record (given by its input nodes), whether no recorded output node lies at or
    below its inputs."""
    missing = [node for nodes in inputs for node in nodes if node not in reach]
    if missing:
        _walk(missing, cuts, reach)
    return [not any(map(reach.__getitem__, nodes)) for nodes in inputs]


def source_records(records: list[tuple[str, Record]]) -> list[bool]:
    """For each record, whether no other record's output lies upstream of its inputs.

    In the backward pass, the output node of every other record lies on a path to the outputs of
    these "source" records, so asking autograd only for the sources' output gradients still runs
    every recorded node, whose pre-hooks then see their output gradients as they go by and can
    be processed (and freed) at once instead of all being held until the end. (Without a graph
    check to make: :func:`check_graph` returns the same from its own walk.)
    """
    cuts = {edge.node: [] for _, r in records for edge in r.edges}
    return _sources([_input_nodes(r) for _, r in records], cuts, {})
