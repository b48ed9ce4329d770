"""The MaxText target's arrays: every output kind's leaf arrays and chunk grids, and the values for a piece.

The single definition of what rayconv writes: :func:`output_arrays` says which arrays each output holds and how
they are chunked (one chunk per piece, see rayconv.plan), :func:`piece_outputs` what one block of G becomes in
each; the worker writes it and ``rayconv verify`` compares it with what is stored. Kinds are the objects of
:mod:`rayconv.targets.maxtext_kinds`; tree paths come from the plan's layout (:mod:`rayconv.trees`).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from rayconv import mapping, quantize, trees
from rayconv.mapping import Rule
from rayconv.models import ModelSpec
from rayconv.leaves import ArraySpec
from rayconv.plan import Piece, Plan, block_region
from rayconv.receipts import JobContext
from rayconv.targets.maxtext_kinds import OutputKind


def _layers(rule: Rule, spec: ModelSpec) -> Sequence[int | None]:
    return range(spec.n_layers) if rule.per_layer else (None,)


def _layer_chunks(rule: Rule, spec: ModelSpec, rows: int, experts: int | None = None) -> tuple[int, ...]:
    region = block_region(rule, spec, 0, rows, None if experts is None else (0, experts))
    return tuple(stop - start for start, stop in region)


def scale_shape(shape: Sequence[int], contraction: Sequence[int]) -> tuple[int, ...]:
    return tuple(1 if axis in contraction else n for axis, n in enumerate(shape))


def leaf_paths(rule: Rule, layer: int | None, kind: OutputKind, tree: trees.TreeLayout = trees.LINEN) -> tuple[str, ...]:
    """Tree path of a rule's leaf in a given output (unscanned/AQT name layers ``layers_{i}``); the layout
    (:mod:`rayconv.trees`) decides the wrapping (``params/params/…`` or NNX ``…/value``)."""
    return tree.leaf_path(rule, layer, kind)


def aqt_paths(rule: Rule, layer: int, tree: trees.TreeLayout = trees.LINEN) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(qvalue path, scale path) of an AQT-frozen kernel in the layout's AQT tree."""
    return tree.aqt_paths(rule, layer)


def output_arrays(plan: Plan, kind: OutputKind) -> list[ArraySpec]:
    spec = plan.spec
    tree = plan.tree
    arrays: list[ArraySpec] = []
    for ri, rule in enumerate(plan.rules):
        shape = mapping.layer_shape(rule, spec)
        chunks = _layer_chunks(rule, spec, plan.piece_rows[ri], plan.piece_experts.get(ri))
        if kind.scanned and rule.per_layer:
            arrays.append(ArraySpec(leaf_paths(rule, 0, kind, tree), mapping.scanned_shape(shape, spec.n_layers),
                                    "bfloat16", mapping.scanned_shape(chunks, 1)))
            continue
        for layer in _layers(rule, spec):
            if kind.quantized and rule.quantized:
                qpath, spath = aqt_paths(rule, layer, tree)
                arrays.append(ArraySpec(qpath, shape, kind.qvalue_dtype(plan.quantize_type), chunks))
                arrays.append(ArraySpec(spath, scale_shape(shape, rule.contraction), "bfloat16",
                                        scale_shape(chunks, rule.contraction)))
            else:
                arrays.append(ArraySpec(leaf_paths(rule, layer, kind, tree), shape, "bfloat16", chunks))
    return arrays


def _slices(region: tuple[tuple[int, int], ...]) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in region)


def _scanned_region(region: tuple[slice, ...], layer: int) -> tuple[slice, ...]:
    return region[:1] + (slice(layer, layer + 1),) + region[1:]


def piece_outputs(ctx: JobContext, rule: Rule, piece: Piece, block: mapping.Block) -> Iterator[
        tuple[OutputKind, tuple[str, ...], tuple[slice, ...], np.ndarray]]:
    """Everything one block of G becomes: (output kind, leaf path, region, array) per destination."""
    spec = ctx.spec
    tree = trees.get(ctx.layout)
    array = mapping.to_layer_block(rule, block, spec)
    region = _slices(block_region(rule, spec, piece.row0, piece.row1, piece.experts))
    for kind in ctx.kinds:
        if kind.scanned:
            if rule.per_layer:
                yield (kind, leaf_paths(rule, 0, kind, tree), _scanned_region(region, piece.layer),
                       np.expand_dims(array, 1))
            else:
                yield kind, leaf_paths(rule, None, kind, tree), region, array
        elif not (kind.quantized and rule.quantized):
            yield kind, leaf_paths(rule, piece.layer, kind, tree), region, array
        else:
            bits = quantize.QUANT_TYPES[ctx.quantize_type][0]
            qvalue, scale = quantize.quantize(array, rule.contraction, bits)
            qpath, spath = aqt_paths(rule, piece.layer, tree)
            yield kind, qpath, region, qvalue
            scale_region = tuple(slice(0, 1) if axis in rule.contraction else s for axis, s in enumerate(region))
            yield kind, spath, scale_region, scale
