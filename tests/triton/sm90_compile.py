"""Compile the attention / indexer / mHC / small-op / paged-cache / FP8 quantizer / CSA2 / Engram Triton kernels
for sm_90 without a GPU.

The interpreter runs kernels as Python and accepts code the compiler rejects; this script
sends the same kernels, with the launch configurations the launchers use, through the real
Triton compiler to an sm_90a cubin and reads ptxas's register / spill counts. It needs no GPU,
only the NVIDIA backend that ships with the triton wheel (its ptxas).

Run in a process **without** ``TRITON_INTERPRET=1`` (with it, ``@triton.jit`` builds interpreter
objects the compiler cannot take):

    python -m tests.triton.sm90_compile          # table
    python -m tests.triton.sm90_compile --json   # one JSON list on stdout
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Case:
    """One kernel x launch configuration to compile."""

    name: str
    kernel: str                      # "module:function" under v4hal.backends.triton
    types: dict[str, str]            # non-int argument types ("*bf16", "fp32", ...); others are i32
    constexprs: dict[str, Any]
    aligned: tuple[str, ...] = ()    # arguments specialised as multiples of 16 (pointers, strides)
    num_warps: int = 4
    num_stages: int = 2
    serving: bool = True             # a production-dtype configuration: must not spill
    extra: dict[str, Any] = field(default_factory=dict)


def _attn_cases() -> list[Case]:
    from v4hal.backends.triton import attention

    aligned = ("q_ptr", "kv_ptr", "sink_ptr", "idx_ptr", "out_ptr", "s_qb", "s_qm", "s_qh", "s_kb", "s_kn",
               "s_ib", "s_im", "s_ob", "s_om", "s_oh", "D")

    def types(dt: str) -> dict[str, str]:
        return {"q_ptr": f"*{dt}", "kv_ptr": f"*{dt}", "sink_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": f"*{dt}",
                "qk_scale": "fp32"}

    cases = []
    for cfg in attention._GPU_CONFIGS:
        bh, bn = cfg.kwargs["BLOCK_H"], cfg.kwargs["BLOCK_N"]
        cases.append(Case(f"sparse_attn bf16 d=512 BH={bh} BN={bn} w={cfg.num_warps} s={cfg.num_stages}",
                          "attention:_sparse_attn_kernel", types("bf16"),
                          dict(BLOCK_H=bh, BLOCK_N=bn, BLOCK_D=512, EVEN_D=True, UPCAST=False, PREC="tf32"),
                          aligned, cfg.num_warps, cfg.num_stages, serving=not (bh == 64 and bn == 32)))
    cases.append(Case("sparse_attn fp16 d=64 BH=16 BN=32", "attention:_sparse_attn_kernel", types("fp16"),
                      dict(BLOCK_H=16, BLOCK_N=32, BLOCK_D=64, EVEN_D=True, UPCAST=False, PREC="tf32"), aligned))
    cases.append(Case("sparse_attn fp32 d=512 (ieee, fixed config)", "attention:_sparse_attn_kernel", types("fp32"),
                      dict(BLOCK_H=16, BLOCK_N=16, BLOCK_D=512, EVEN_D=True, UPCAST=False, PREC="ieee"), aligned))
    return cases


def _indexer_cases() -> list[Case]:
    aligned = ("q_ptr", "k_ptr", "w_ptr", "out_ptr", "s_qb", "s_qs", "s_qh", "s_kb", "s_kt", "s_ob", "s_os", "D")
    bf16 = {"q_ptr": "*bf16", "k_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp32"}
    f32 = {"q_ptr": "*fp32", "k_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*fp32"}
    base = dict(BLOCK_D=128, EVEN_D=True, TO_F32=False)
    return [
        Case("index_scores bf16 H=64 (2 queries x 64 heads, 64 keys)", "indexer:_index_scores_kernel", bf16,
             dict(base, BLOCK_S=2, HP=64, BLOCK_T=64, MASK=True, PREC="tf32"), aligned),
        Case("index_scores bf16 H=1 (16 queries)", "indexer:_index_scores_kernel", bf16,
             dict(base, BLOCK_S=16, HP=1, BLOCK_T=64, MASK=False, PREC="tf32"), aligned),
        Case("index_scores fp32 H=64 (tf32x3)", "indexer:_index_scores_kernel", f32,
             dict(base, BLOCK_S=1, HP=64, BLOCK_T=32, MASK=True, PREC="tf32x3"), aligned, serving=False),
    ]


def _mhc_cases() -> list[Case]:
    mix_types = {"x_ptr": "*bf16", "fn_ptr": "*fp32", "part_ptr": "*fp32", "sq_ptr": "*fp32"}
    apply_types = {"part_ptr": "*fp32", "sq_ptr": "*fp32", "scale_ptr": "*fp32", "base_ptr": "*fp32",
                   "x_ptr": "*bf16", "y_ptr": "*bf16", "post_ptr": "*fp32", "comb_ptr": "*fp32", "pre_ptr": "*fp32",
                   "norm_eps": "fp32", "hc_eps": "fp32"}
    split_types = {"mix_ptr": "*fp32", "scale_ptr": "*fp32", "base_ptr": "*fp32", "pre_ptr": "*fp32",
                   "post_ptr": "*fp32", "comb_ptr": "*fp32", "eps": "fp32"}
    post_types = {"x_ptr": "*bf16", "res_ptr": "*bf16", "post_ptr": "*fp32", "comb_ptr": "*fp32", "out_ptr": "*bf16"}
    cases = [Case(f"hc_mix bf16 BT={bt}", "mhc:_hc_mix_kernel", mix_types,
                  dict(BLOCK_T=bt, BLOCK_K=64, MIXP=32, PREC="tf32x3"), ("x_ptr", "fn_ptr", "s_xt", "s_fn", "K_SPLIT"),
                  4, 2 if bt == 64 else 3) for bt in (16, 32, 64)]
    # mix_only (hc_mix): the launcher passes the fp32 ``pre`` output as y_ptr
    cases += [Case(f"hc_apply head={head} mix_only={mix_only}", "mhc:_hc_apply_kernel",
                   {**apply_types, "y_ptr": "*fp32"} if mix_only else apply_types,
                   dict(BLOCK_T=4, HCP=4, MIXP=16 if head else 32, BLOCK_D=256, HEAD=head, MIX_ONLY=mix_only),
                   ("x_ptr", "y_ptr", "s_xt", "s_xh", "s_yt"))
              for head, mix_only in ((False, False), (True, False), (False, True))]
    collapse_types = {"x_ptr": "*bf16", "pre_ptr": "*fp32", "y_ptr": "*bf16"}
    cases.append(Case("hc_collapse", "mhc:_hc_collapse_kernel", collapse_types,
                      dict(BLOCK_T=4, HCP=4, BLOCK_D=256), ("x_ptr", "y_ptr", "s_xt", "s_xh", "s_yt")))
    cases.append(Case("hc_split", "mhc:_hc_split_kernel", split_types, dict(BLOCK_T=64, HCP=4)))
    cases.append(Case("hc_post", "mhc:_hc_post_kernel", post_types, dict(HCP=4, BLOCK_D=512),
                      ("x_ptr", "res_ptr", "out_ptr", "s_xt", "s_rt", "s_rh", "s_ot", "s_oh")))
    return cases


def _small_cases() -> list[Case]:
    rms = {"x_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*bf16", "eps": "fp32"}
    cases = [Case(f"rms_norm single={single}", "small:_rms_norm_kernel", rms, dict(BLOCK_D=8192, SINGLE=single),
                  ("x_ptr", "w_ptr", "out_ptr", "s_x", "s_o"), 8) for single in (True, False)]
    for dt, br in (("bf16", 64), ("fp32", 16)):
        t = {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "scale": "fp32"}
        cases.append(Case(f"hadamard rows {dt} D=128", "small:_hadamard_rows_kernel", t,
                          dict(BLOCK_R=br, DP=128, UPCAST=False, F32=dt == "fp32"), ("x_ptr", "out_ptr", "s_x", "s_o")))
    t = {"x_ptr": "*bf16", "out_ptr": "*bf16", "scale": "fp32"}
    for a, b, w in ((16, 16, 4), (64, 128, 8)):
        cases.append(Case(f"hadamard kron bf16 {a}x{b}", "small:_hadamard_kron_kernel", t,
                          dict(A=a, B=b, UPCAST=False, F32=False), ("x_ptr", "out_ptr", "s_x", "s_o"), w))
    cases.append(Case("rotary bf16", "small:_rotary_kernel", {"x_ptr": "*bf16", "f_ptr": "*fp32", "out_ptr": "*bf16"},
                      dict(INVERSE=True, BLOCK_H=16, BLOCK_P=32)))
    return cases


def _paged_cases() -> list[Case]:
    write = {"cache_ptr": "*u8", "x_ptr": "*bf16", "slots_ptr": "*i32", "amax_floor": "fp32", "max_inv": "fp32"}
    read = {"cache_ptr": "*u8", "out_ptr": "*bf16", "slots_ptr": "*i32"}
    copy = {"dst_ptr": "*i16", "src_ptr": "*i16", "slots_ptr": "*i64"}
    # the launchers' tile sizes at V4's entry widths (512 / 128) and at v4-mini's (128 / 64)
    sizes = [("model1_fp8", "model1", 4, dict(NB=7, SB=8, R=8)), ("indexer_fp4", "fp4", 1, dict(NB=4, SB=4, R=4)),
             ("indexer_fp8", "fp8", 1, dict(D=128, DP=128)), ("model1_fp8 D=128", "model1", 4, dict(NB=1, SB=8, R=8)),
             ("indexer_fp4 D=64", "fp4", 1, dict(NB=2, SB=4, R=4)), ("indexer_fp8 D=64", "fp8", 1, dict(D=64, DP=64))]
    cases = [Case(f"paged_cache_write {name}", f"paged_cache:_write_{k}_kernel", write, c, ("x_ptr", "s_xt"), w)
             for name, k, w, c in sizes]
    cases += [Case(f"paged_cache_read {name}", f"paged_cache:_read_{k}_kernel", read, c, ("out_ptr",), w)
              for name, k, w, c in sizes]
    cases += [Case(f"paged_cache bf16 D={d} {'write' if wr else 'read'}", "paged_cache:_copy_bf16_kernel", copy,
                   dict(WRITE=wr, D=d, DP=d)) for wr in (True, False) for d in (512, 128)]
    # V4.1's layouts at D = 512 (window: 16 blocks of 32; compressed: 32 blocks of 16) and D = 128
    v41 = dict(write, scale_floor="fp32")
    for k, nbs in (("v41_fp8", (16, 4)), ("v41_fp4", (32, 8))):
        for nb in nbs:
            c = dict(NB=nb, R=nb)
            cases.append(Case(f"paged_cache_write {k} NB={nb}", f"paged_cache:_write_{k}_kernel", v41, c,
                              ("x_ptr", "s_xt")))
            cases.append(Case(f"paged_cache_read {k} NB={nb}", f"paged_cache:_read_{k}_kernel", read, c, ("out_ptr",)))
    return cases


def _paged_indexer_cases() -> list[Case]:
    types = {"q_ptr": "*bf16", "cache_ptr": "*u8", "w_ptr": "*fp32", "ctx_ptr": "*i32", "bt_ptr": "*i32",
             "out_ptr": "*fp32", "cand_ptr": "*i32"}
    aligned = ("q_ptr", "cache_ptr", "w_ptr", "out_ptr", "s_qb", "s_qn", "s_qh", "s_page", "s_o")
    dense = [Case(f"indexer_logits_paged {lay} D={d} H=64 (64 keys, bf16 MMA)",
                  "paged_indexer:_indexer_logits_paged_kernel", types,
                  dict(CTX_2D=False, FP8=lay == "indexer_fp8", HP=64, BLOCK_T=64, TO_F32=False, PREC="tf32", D=d,
                       JP=max(16, d // 2), SB=4 if lay == "indexer_fp4" else 0), aligned)
             for lay in ("indexer_fp4", "indexer_fp8") for d in (128, 64)]
    # V4.1's candidate indexer: 32 heads of 128 at 8 blocks of 8 candidate positions per tile
    sparse = [Case(f"indexer_logits_paged_sparse {lay} D=128 H=32 CB=8{' ctx2d' if ctx2d else ''} "
                   "(64 positions, bf16 MMA)",
                   "paged_indexer:_indexer_logits_paged_kernel", types,
                   dict(CTX_2D=ctx2d, FP8=lay == "indexer_fp8", HP=32, BLOCK_T=64, TO_F32=False, PREC="tf32", D=128,
                        JP=64, SB=4 if lay == "indexer_fp4" else 0, SPARSE=True, CB=8), aligned)
              for lay in ("indexer_fp4", "indexer_fp8") for ctx2d in (False, True)]
    return dense + sparse


def _paged_attention_cases() -> list[Case]:
    aligned = ("q_ptr", "sink_ptr", "out_ptr", "lse_ptr", "kv_ptr", "idx_ptr", "xkv_ptr", "xidx_ptr", "s_qb", "s_qm",
               "s_qh", "s_ib", "s_im", "s_xb", "s_xm", "s_ob", "s_om", "s_oh", "s_lb", "s_lh")
    kinds = {"bf16": 0, "model1_fp8": 1, "v41_window_fp8": 2, "v41_compressed_fp4": 3}   # the kernel's KIND

    def sizes(lay: str, d: int) -> tuple[int, int]:                   # (NB, SB) of a cache of d-wide entries
        return {"bf16": (0, 0), "model1_fp8": ((d - 64) // 64, 8), "v41_window_fp8": (0, d // 32),
                "v41_compressed_fp4": (0, d // 16)}[lay]

    cases = []
    # (window layout, extra layout, entry widths): V4's two layouts, V4.1's window + compressed pair and its
    # window cache alone (one layout for both caches)
    for lay, xlay, dims in (("model1_fp8", "model1_fp8", (512, 128)), ("bf16", "bf16", (512, 128)),
                            ("v41_window_fp8", "v41_compressed_fp4", (512,)),
                            ("v41_window_fp8", "v41_window_fp8", (512,))):
        quantized = lay != "bf16"
        kv, xkv = ("*bf16" if lay == "bf16" else "*u8"), ("*bf16" if xlay == "bf16" else "*u8")
        types = {"q_ptr": "*bf16", "sink_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32", "kv_ptr": kv,
                 "idx_ptr": "*i32", "len_ptr": "*i32", "xkv_ptr": xkv, "xidx_ptr": "*i32", "xlen_ptr": "*i32",
                 "qk_scale": "fp32"}
        # the launcher's (BLOCK_H, warps, stages)
        tiles = ((16, 8, 2),) if lay.startswith("v41_") else ((16, 4, 3),) if quantized else ((16, 4, 3), (32, 8, 2))
        for d in dims:                                                 # V4's and v4-mini's entry widths
            (nb, sb), (xnb, xsb) = sizes(lay, d), sizes(xlay, d)
            name = lay if lay == xlay else f"{lay}+{xlay}"
            for bh, warps, stages in tiles:
                cases.append(Case(f"sparse_attn_paged {name} D={d} BH={bh} BN=16 w={warps}",
                                  "paged_attention:_paged_attn_kernel", types,
                                  dict(BLOCK_H=bh, BLOCK_N=16, KIND=kinds[lay], XKIND=kinds[xlay], HAS_LEN=True,
                                       HAS_EXTRA=True, HAS_XLEN=True, UPCAST=False, PREC="tf32", D=d, DP=d, NB=nb,
                                       SB=sb, XNB=xnb, XSB=xsb), aligned, warps, stages))
    return cases


def _quant_cases() -> list[Case]:
    """The kernels that end in the FP8 block-quant epilogue (``quant.fp8_block_quant``)."""
    import triton.language as tl

    cases = []
    for pow2, e8m0, inplace in ((False, False, False), (True, False, False), (True, True, False), (True, False, True)):
        scale = "*u8" if e8m0 else "*fp32"
        mode = "in place" if inplace else ("e8m0" if e8m0 else ("pow2 fp32" if pow2 else "fp32"))
        t = {"x_ptr": "*bf16", "y_ptr": "*u8", "s_ptr": scale, "out_ptr": "*bf16" if inplace else "*fp32",
             "amax_floor": "fp32", "max_inv": "fp32"}
        cases.append(Case(f"act_quant bf16 block=128 {mode}", "quant:_fp8_quant_kernel", t,
                          dict(GS=128, GS_P2=128, BLOCK_G=32, POW2=pow2, S_E8M0=e8m0, INPLACE=inplace, OUT=tl.bfloat16),
                          ("x_ptr", "y_ptr", "out_ptr")))
        if inplace:
            continue
        t = {"gate_ptr": "*bf16", "up_ptr": "*bf16", "w_ptr": "*fp32", "s2f_ptr": "*i32", "h_ptr": "*u8",
             "hs_ptr": scale, "limit": "fp32", "amax_floor": "fp32", "max_inv": "fp32"}
        cases.append(Case(f"moe_experts swiglu + FP8 h {mode}", "moe:_swiglu_kernel", t,
                          dict(CLAMP=True, QUANT=True, POW2=pow2, S_E8M0=e8m0, OUT=tl.bfloat16, BLOCK_R=16,
                               BLOCK_I=128), ("gate_ptr", "up_ptr", "h_ptr")))
        if pow2 == e8m0:
            # a one-off weight conversion: its 128 x 128 tile per program spills, so not held to zero spills
            t = {"w_ptr": "*bf16", "y_ptr": "*u8", "s_ptr": scale, "amax_floor": "fp32", "max_inv": "fp32"}
            cases.append(Case(f"quant_weight_fp8 bf16 block=128 {mode}", "quant:_fp8_weight_quant_kernel", t,
                              dict(BS=128, BS_P2=128, POW2=pow2, S_E8M0=e8m0), ("w_ptr", "y_ptr"), 8, serving=False))
    return cases


def _csa2_cases() -> list[Case]:
    """V4.1's compressor entries at the release width (D = 512, rope 64) and at a small one, bf16 and fp32 x."""
    def types(dt: str, w: str) -> dict[str, str]:
        return {"kv_ptr": "*fp32", "gate_ptr": "*fp32", "state_ptr": "*fp32", "table_ptr": "*i64", "cu_ptr": "*i32",
                "sp_ptr": "*i32", "req_ptr": "*i64", "entry_ptr": "*i64", "w_ptr": f"*{w}", "f_ptr": "*fp32",
                "ent_ptr": f"*{dt}", "lat_ptr": f"*{dt}", "eps": "fp32"}
    import triton.language as tl

    aligned = ("kv_ptr", "gate_ptr", "state_ptr", "ent_ptr", "lat_ptr", "D", "s_sb")
    return [Case(f"csa2 entry {dt} ratio={r} D={d}", "csa2:_csa2_entry_kernel", types(dt, "bf16"),
                 dict(RATIO=r, HP=d // 2, OUT={"bf16": tl.bfloat16, "fp32": tl.float32}[dt]), aligned)
            for dt, r, d in (("bf16", 2, 512), ("bf16", 1, 512), ("fp32", 2, 512), ("bf16", 2, 128))]


def _engram_cases() -> list[Case]:
    """The Engram lookup (256-wide e4m3 rows, e8m0 / fp32 scales), gate (bf16 streams, chunks of 1024) and
    hash (64 tokens / requests per program)."""
    import triton

    cases = []
    for e8m0 in (True, False):
        t = {"rows_ptr": "*i64", "table_ptr": "*u8", "s_ptr": "*u8" if e8m0 else "*fp32", "out_ptr": "*bf16"}
        cases.append(Case(f"engram_lookup W=256 {'e8m0' if e8m0 else 'fp32'} scales", "engram:_lookup_kernel", t,
                          dict(S_E8M0=e8m0, BLOCK_R=16, WP=256, SB=32), ("table_ptr", "out_ptr")))
    for mask in (True, False):
        t = {"h_ptr": "*bf16", "kv_ptr": "*bf16", "q_ptr": "*fp32", "k_ptr": "*fp32", "m_ptr": "*i1",
             "out_ptr": "*bf16", "eps": "fp32", "inv_sqrt_d": "fp32", "clamp": "fp32"}
        cases.append(Case(f"engram_gate bf16 mask={mask}", "engram:_gate_kernel", t,
                          dict(HAS_MASK=mask, BLOCK_D=1024), ("h_ptr", "kv_ptr", "q_ptr", "k_ptr", "out_ptr")))
    t = {"ids_ptr": "*i64", "cu_ptr": "*i32", "hist_ptr": "*i64", "mult_ptr": "*i64", "primes_ptr": "*i64",
         "rows_ptr": "*i64", "new_hist_ptr": "*i64"}
    for n, heads in ((4, 8), (3, 2)):           # the release's 3 n-gram sizes x 8 heads; a small layout
        cases.append(Case(f"engram_hash N={n} H={heads}", "engram:_hash_kernel", t,
                          dict(N=n, H=heads, CP=triton.next_power_of_2((n - 1) * heads),
                               BP=triton.next_power_of_2(n - 1), BLOCK_T=64, BLOCK_B=64),
                          ("ids_ptr", "rows_ptr")))
    return cases


def _v41_gemm_gate_cases() -> list[Case]:
    """V4.1 weight formats in the GEMM kernel (32x32 FP8 tiles: K step 32; FP4 per 16: two masked
    half-tile products per 32-wide step) at the launchers' GPU tile sizes, and the V4.1 router
    variant of the gate kernel (temperature and image bias)."""
    import triton.language as tl

    # contiguous operands: unit strides are specialised to 1 by Triton, the others (and K, N) are
    # multiples of 16 at every V4.1 shape
    aligned = ("a_ptr", "as_ptr", "b_ptr", "bs_ptr", "c_ptr", "s_am", "s_bn", "s_cm", "s_be", "s_bse", "K", "N")
    unit = dict(s_ak=1, s_bk=1, s_cn=1, s_ask=1, s_bsk=1)
    # (B_KIND, WB, grouped, [(BLOCK_M, BLOCK_N, warps, stages)]): dense_config's and grouped_config's GPU tiles
    plans = ((1, 32, False, ((16, 64, 4, 4), (32, 64, 4, 4), (64, 64, 4, 3), (64, 128, 4, 4), (64, 128, 4, 3))),
             (1, 32, True, ((16, 128, 4, 4), (64, 64, 4, 3))),
             (2, 16, False, ((16, 64, 4, 6), (32, 64, 4, 6), (64, 64, 4, 4), (128, 64, 8, 4))),
             (2, 16, True, ((16, 64, 4, 6), (64, 64, 4, 4))))
    cases = []
    for b_kind, wb, grouped, configs in plans:
        t = {"a_ptr": "*fp8e4nv", "as_ptr": "*u8", "b_ptr": "*fp8e4nv" if b_kind == 1 else "*u8", "bs_ptr": "*u8",
             "c_ptr": "*bf16", "offs_ptr": "*i64"}
        for bm, bn, warps, stages in configs:
            what = "fp8 32x32" if b_kind == 1 else "fp4 per-16"
            cases.append(Case(f"{'grouped' if grouped else 'dense'} gemm {what} {bm}x{bn} w={warps} s={stages}",
                              "gemm:gemm_kernel", t,
                              dict(A_SCALED=True, B_KIND=b_kind, AS_E8M0=True, BS_E8M0=True, GROUPED=grouped,
                                   E_P2=64 if grouped else 1, DOT=None, PREC=None, EVEN_K=True, OUT=tl.bfloat16,
                                   WB=wb, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32, GROUP_M=8, **unit),
                              aligned, warps, stages))
    # the largest grouped tiles: FP8 64x128 spills in V4's 128x128-tile format too (352 B under this
    # harness; 32x32 tiles: 276 B), so it is compiled but not held to zero spills; FP4 per 16 at 128x64 is
    for b_kind, wb, bm, bn, warps, stages in ((1, 32, 64, 128, 4, 3), (2, 16, 128, 64, 8, 4)):
        t = {"a_ptr": "*fp8e4nv", "as_ptr": "*u8", "b_ptr": "*fp8e4nv" if b_kind == 1 else "*u8", "bs_ptr": "*u8",
             "c_ptr": "*bf16", "offs_ptr": "*i64"}
        what = "fp8 32x32" if b_kind == 1 else "fp4 per-16"
        cases.append(Case(f"grouped gemm {what} {bm}x{bn} w={warps} s={stages}", "gemm:gemm_kernel", t,
                          dict(A_SCALED=True, B_KIND=b_kind, AS_E8M0=True, BS_E8M0=True, GROUPED=True, E_P2=64,
                               DOT=None, PREC=None, EVEN_K=True, OUT=tl.bfloat16, WB=wb, BLOCK_M=bm, BLOCK_N=bn,
                               BLOCK_K=32, GROUP_M=8, **unit),
                          aligned, warps, stages, serving=b_kind == 2))
    t = {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*fp32", "scores_ptr": "*fp32", "choice_ptr": "*fp32",
         "ibias_ptr": "*fp32", "imask_ptr": "*u8", "gate_temp": "fp32"}
    for bt, be in ((16, 16), (64, 64)):
        cases.append(Case(f"moe_gate v41 router bf16 {bt}x{be}", "moe:_gate_kernel", t,
                          dict(SCORE=0, HAS_BIAS=True, PREC="tf32", TEMP=True, IMAGE=True, BLOCK_T=bt, BLOCK_E=be,
                               BLOCK_K=64),
                          ("x_ptr", "w_ptr", "scores_ptr", "choice_ptr", "s_xt", "s_we", "s_ot", "D", "E"), 4))
    return cases


GROUPS = {"attention": _attn_cases, "indexer": _indexer_cases, "mhc": _mhc_cases, "small": _small_cases,
          "paged": _paged_cases, "paged_indexer": _paged_indexer_cases,
          "paged_attention": _paged_attention_cases, "quant": _quant_cases, "csa2": _csa2_cases,
          "engram": _engram_cases, "v41_gemm_gate": _v41_gemm_gate_cases}


def _ptxas() -> str:
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one accepts the PTX version Triton emits
        path = os.path.join(bindir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no ptxas under {bindir}")


def compile_case(case: Case) -> dict[str, Any]:
    """Compile one case to an sm_90a cubin; returns name, registers, spill bytes, shared memory, MMA kind."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, fn_name = case.kernel.split(":")
    fn = getattr(importlib.import_module(f"v4hal.backends.triton.{module}"), fn_name)
    names = fn.arg_names
    constexprs = dict(case.constexprs)
    if "SOFT" in names:              # the interpreter's integer bf16 rounding: never on a compiled path
        constexprs.setdefault("SOFT", False)
    signature = {n: "constexpr" if n in constexprs else case.types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in case.aligned}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        res = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    info = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return {"name": case.name, "regs": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) if spill else None, "smem": int(compiled.metadata.shared),
            "mma": "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "none"),
            "serving": case.serving,
            "bf16_out": any(case.types.get(n) == "*bf16" for n in ("out_ptr", "y_ptr")),
            "bf16_cvt": ptx.count("cvt.rn.bf16")}     # hardware fp32 -> bf16 conversions (f32 and bf16x2)


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    groups = [a for a in argv if not a.startswith("--")] or list(GROUPS)
    cases = [c for g in groups for c in GROUPS[g]()]
    jobs = max(1, min(4, os.cpu_count() or 1))
    if jobs == 1:
        rows = [compile_case(c) for c in cases]
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs) as pool:
            rows = list(pool.map(compile_case, cases))
    if "--json" in argv:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['name']:58s} regs={r['regs']:>4} spill={r['spill_bytes']:>6} smem={r['smem']:>7} {r['mma']:8s} "
                  f"cvt.rn.bf16={r['bf16_cvt']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
