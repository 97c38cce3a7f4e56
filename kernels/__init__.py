"""mhla_kernels: the Multi-Head Linear Attention operator (no torch.distributed here).

    from mhla_kernels import mhla, mhla_reference
    o = mhla(q, k, v, mixing, block_size, causal=True)

See DESIGN §1 for the math and §4 for the contract.
"""

if __name__ != "mhla_kernels":  # imported as the bare `kernels`: not this package's name
    from ._bare_name import hand_over

    hand_over(__name__, __file__)
else:
    from .decode import MHLADecodeState, mhla_decode_step
    from .feature_maps import FEATURE_MAPS, feature_map
    from .functional import BACKENDS, mhla, resolve_backend
    from .mixing import block_grid_mixing, causal_mixing
    from .packing import (
        DocumentLayout,
        check_cu_seqlens,
        document_ids,
        document_layout,
        document_positions,
        resolve_layout,
    )
    from .reference import mhla_reference
    from .stages import (
        IntraBlockTerms,
        block_outputs,
        block_outputs_intra,
        block_summaries,
        mix_summaries,
    )
    from .validation import check_values

__all__ = [
    "BACKENDS",
    "DocumentLayout",
    "FEATURE_MAPS",
    "IntraBlockTerms",
    "MHLADecodeState",
    "block_grid_mixing",
    "block_outputs",
    "block_outputs_intra",
    "block_summaries",
    "causal_mixing",
    "check_cu_seqlens",
    "check_values",
    "document_ids",
    "document_layout",
    "document_positions",
    "feature_map",
    "mhla",
    "mhla_decode_step",
    "mhla_reference",
    "mix_summaries",
    "resolve_backend",
    "resolve_layout",
]
