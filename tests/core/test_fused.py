"""The fused CPU kernels (arserve.core.fused): the same results as the PyTorch
ops that define them, and each row's bits independent of the batch it runs in."""

import pytest
import torch
import torch.nn.functional as F

from arserve.core import fused
from arserve.core.model import fold_sign, rope_tables
from arserve.core.config import LlamaConfig

K = fused.kernels()


def test_the_kernels_build_on_this_machine():
    # make install builds them; a machine with a compiler serves on the fused path
    assert K is not None


def test_a_new_build_removes_old_ones_but_the_newest_and_those_under_way(tmp_path):
    import os
    import time

    now = time.time()
    builds = {}
    for i, age_h in enumerate([0, 0.2, 5, 30, 60, 90, 200]):  # hours since built
        p = tmp_path / f"{i:016x}"
        p.mkdir()
        (p / "arserve_fused.so").write_bytes(b"")
        os.utime(p, (now - age_h * 3600, now - age_h * 3600))
        builds[age_h] = p
    (tmp_path / "notes").mkdir()  # not a build: left alone
    removed = fused.forget_old_builds(builds[0], keep=3, min_age_s=3600)
    # kept: the new one, the 3 newest others (0.2 h, 5 h, 30 h); removed: 60, 90, 200 h
    assert sorted(removed) == sorted([builds[60], builds[90], builds[200]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([builds[h].name for h in (0, 0.2, 5, 30)] + ["notes"])
    # with keep=0 a build younger than an hour (another process may be writing it) stays
    assert fused.forget_old_builds(builds[0], keep=0) == [builds[5], builds[30]]
    assert builds[0.2].exists()


def eager(monkeypatch):
    monkeypatch.setattr(fused, "on", lambda x: None)


@pytest.mark.parametrize("rows", [1, 3, 130])  # 130 rows: threads split the rows
def test_norms_match_pytorch(rows, monkeypatch):
    torch.manual_seed(0)
    x, d, w = torch.randn(rows, 576), torch.randn(rows, 576), torch.randn(576)
    y = fused.rms_norm(x, w, 1e-5)
    s, y2 = fused.add_rms_norm(x, d, w, 1e-5)
    eager(monkeypatch)
    torch.testing.assert_close(y, fused.rms_norm(x, w, 1e-5), rtol=2e-6, atol=1e-6)
    s_ref, y2_ref = fused.add_rms_norm(x, d, w, 1e-5)
    assert torch.equal(s, s_ref)  # one rounding, as torch's add
    torch.testing.assert_close(y2, y2_ref, rtol=2e-6, atol=1e-6)


def test_silu_mul_matches_pytorch(monkeypatch):
    torch.manual_seed(1)
    gu = torch.randn(5, 2 * 1536) * 4
    y = fused.silu_mul(gu)
    eager(monkeypatch)
    torch.testing.assert_close(y, fused.silu_mul(gu), rtol=2e-6, atol=1e-6)


def test_rope_is_bitwise_pytorchs(monkeypatch):
    c = LlamaConfig.from_name("smollm2-135m")
    H, Kv, hd = c.n_heads, c.n_kv_heads, c.head_dim
    cos, sin = rope_tables(c)
    pos = torch.tensor([0, 7, 300, 301])
    torch.manual_seed(2)
    qkv = torch.randn(4, (H + 2 * Kv) * hd)
    qk, v = fused.rope_qkv(qkv, cos[pos], fold_sign(sin[pos]), H, Kv)
    eager(monkeypatch)
    qk_ref, v_ref = fused.rope_qkv(qkv, cos[pos], fold_sign(sin[pos]), H, Kv)
    assert qk.shape == (H + Kv, 4, hd) and v.shape == (Kv, 4, hd)
    assert torch.equal(qk, qk_ref) and torch.equal(v, v_ref)  # built with -ffp-contract=off: no fused multiply-adds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_in_vector_lanes_has_the_bits_of_one_element_at_a_time(dtype):
    """A row's whole vectors run in lanes, its last elements one by one: the
    same arithmetic, so each element's bits do not depend on where it sits
    (a gate one element wide runs only the one-by-one path)."""
    torch.manual_seed(5)
    g = torch.cat([torch.randn(3, 60) * 8, torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0]] * 3)], 1)
    g[:, 0] = torch.tensor([100.0, -100.0, 1e-30])  # e^-a clamped both ways, a denormal-sized gate
    g, u = g.to(dtype), (torch.randn(3, 64) * 3).to(dtype)
    lanes = fused.silu_mul(torch.cat([g, u], 1))
    for j in range(64):
        one = fused.silu_mul(torch.cat([g[:, j:j + 1], u[:, j:j + 1]], 1))
        assert torch.equal(lanes[:, j:j + 1].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           one.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), j


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_bits_do_not_depend_on_the_batch(dtype):
    torch.manual_seed(3)
    R = 200  # large enough that threads split the rows
    x, d, w = (torch.randn(R, 576, dtype=dtype), torch.randn(R, 576, dtype=dtype), torch.randn(576, dtype=dtype))
    gu = torch.randn(R, 2 * 1536, dtype=dtype)
    whole = (fused.rms_norm(x, w, 1e-5), *fused.add_rms_norm(x, d, w, 1e-5), fused.silu_mul(gu))
    for r in (0, 57, R - 1):
        alone = (fused.rms_norm(x[r:r + 1], w, 1e-5), *fused.add_rms_norm(x[r:r + 1], d[r:r + 1], w, 1e-5),
                 fused.silu_mul(gu[r:r + 1]))
        for a, b in zip(whole, alone):
            assert torch.equal(a[r:r + 1], b)


def test_bad_shapes_are_refused_with_a_message():
    with pytest.raises(RuntimeError, match="w must be a contiguous"):
        fused.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="even width"):
        fused.silu_mul(torch.randn(2, 7))


def test_non_cpu_or_off_takes_the_eager_path(monkeypatch):
    monkeypatch.setattr(fused, "kernels", lambda: None)
    x, w = torch.randn(2, 16), torch.randn(16)
    assert torch.equal(fused.rms_norm(x, w, 1e-5), F.rms_norm(x, (16,), w, 1e-5))


@pytest.mark.parametrize("hd", [64, 48])  # bfloat16: whole pair vectors, or (AVX-512) widened a vector at a time
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_sdpa_and_each_rows_bits_are_its_own(dtype, hd):
    torch.manual_seed(4)
    B, H, Kv, P = 6, 9, 3, 240
    q, k, v = torch.randn(B, H, hd, dtype=dtype), torch.randn(B, Kv, P, hd, dtype=dtype), torch.randn(B, Kv, P, hd, dtype=dtype)
    lengths = [200, 1, 240, 17, 33, 100]  # a partial last vector of keys, a single key, all keys
    out = K.decode_attention(q, k, v, lengths, hd ** -0.5)
    mask = (torch.arange(P) < torch.tensor(lengths)[:, None]).view(B, 1, 1, P)
    ref = F.scaled_dot_product_attention(q.unsqueeze(2).float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)[:, :, 0]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    for b in range(B):  # alone, over a shorter cache, and as one of a broadcast chain
        alone = K.decode_attention(q[b:b + 1], k[b:b + 1, :, :lengths[b]], v[b:b + 1, :, :lengths[b]], [lengths[b]], hd ** -0.5)
        assert torch.equal(alone, out[b:b + 1])
    chain = K.decode_attention(q[:1].expand(3, H, hd), k[:1].expand(3, Kv, P, hd), v[:1].expand(3, Kv, P, hd),
                               [198, 199, 200], hd ** -0.5)
    assert torch.equal(chain[2:], out[:1])
    with pytest.raises(RuntimeError, match="length must be in"):
        K.decode_attention(q, k, v, [0] * B, 1.0)


@pytest.mark.parametrize("hd", [64, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_sums_the_values_in_key_order_in_float32(dtype, hd):
    """Equal scores (q = 0): each output element is the float32 sum of its
    values taken key by key, over the count, bit for bit, whether bfloat16
    values are loaded in pairs or widened (decision 75)."""
    torch.manual_seed(6)
    Kv, n = 3, 37
    v = torch.randn(1, Kv, n, hd, dtype=dtype)
    out = K.decode_attention(torch.zeros(1, 9, hd, dtype=dtype), torch.randn(1, Kv, n, hd, dtype=dtype), v, [n], 1.0)
    total = torch.zeros(Kv, hd)
    for j in range(n):
        total = total + v[0, :, j].float()
    expected = (total / n).to(dtype).repeat_interleave(3, 0)  # [H, hd]: three query heads a key/value head
    assert torch.equal(out[0], expected)


def test_decode_attention_reads_a_rows_tail_from_where_it_lies_with_the_bits_of_a_contiguous_path():
    """A draft tree's row: its context, then its path's keys wherever the
    tree put them, read in path order: the bits of the same keys held
    contiguously (a chain of that path)."""
    torch.manual_seed(5)
    H, Kv, hd, start = 9, 3, 64, 37
    q = torch.randn(1, H, hd)
    k, v = torch.randn(1, Kv, 80, hd), torch.randn(1, Kv, 80, hd)
    path = [start + 5, start + 1, start + 9]  # the tree's slots of the path, root first
    chain_k, chain_v = k.clone(), v.clone()  # the same path laid out after the context, as a chain holds it
    chain_k[:, :, start:start + 3], chain_v[:, :, start:start + 3] = k[:, :, path], v[:, :, path]
    chain = K.decode_attention(q, chain_k, chain_v, [start + 3], hd ** -0.5)
    tree = K.decode_attention(q, k, v, [start + 3], hd ** -0.5, [path])
    assert torch.equal(tree, chain)
    assert not torch.equal(K.decode_attention(q, k, v, [start + 3], hd ** -0.5), chain)  # (the positions mattered)
    with pytest.raises(RuntimeError, match="none, or one per query"):
        K.decode_attention(q, k, v, [start + 3], 1.0, [path, path])
    with pytest.raises(RuntimeError, match="tail's position"):
        K.decode_attention(q, k, v, [start + 3], 1.0, [[80]])
    with pytest.raises(RuntimeError, match="longer than its length"):
        K.decode_attention(q, k, v, [2], 1.0, [path])


def causal_reference(q, k, v, start):  # float64 SDPA: query p attends keys [0, start + p]
    n = q.shape[1]
    mask = torch.ones(n, start + n, dtype=torch.bool).tril_(start)
    return F.scaled_dot_product_attention(q.double().unsqueeze(0), k.double().unsqueeze(0), v.double().unsqueeze(0),
                                          attn_mask=mask, enable_gqa=True)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, Kv, n, start, hd", [
    (9, 3, 150, 0, 64),  # SmolLM2's heads: a prompt of several key blocks and query tiles
    (9, 3, 37, 0, 64),  # one partial query tile
    (9, 3, 70, 130, 64),  # a chunk after 130 cached positions
    (4, 4, 1, 5, 64),  # one query, no grouping
    (8, 2, 200, 0, 128),  # four query heads a key/value head, a wider head
])
def test_causal_attention_matches_sdpa(dtype, H, Kv, n, start, hd):
    torch.manual_seed(5)
    q = torch.randn(H, n, hd).to(dtype)
    k, v = torch.randn(Kv, start + n, hd).to(dtype), torch.randn(Kv, start + n, hd).to(dtype)
    out = K.causal_attention(q, k, v, start, hd ** -0.5)
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.double(), causal_reference(q, k, v, start), **tol)


@pytest.mark.parametrize("hd", [16, 48])
def test_narrow_heads_run_the_kernel_where_its_width_divides_them_and_sdpa_elsewhere(hd):
    # The kernel's head-dimension multiple is its value tile's width: 16 on an AVX2 build, 64 with AVX-512.
    torch.manual_seed(8)
    q, k, v = torch.randn(6, 90, hd), torch.randn(2, 100, hd), torch.randn(2, 100, hd)
    if hd % K.causal_attention_width() == 0:
        out = K.causal_attention(q, k, v, 10, hd ** -0.5)
    else:
        with pytest.raises(RuntimeError, match="head_dim must be a multiple"):
            K.causal_attention(q, k, v, 10, hd ** -0.5)
        out = fused.causal_attention(q, k, v, 10)  # PyTorch's SDPA
    torch.testing.assert_close(out.double(), causal_reference(q, k, v, 10), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("keys", ["rising", "falling"])
def test_causal_attention_holds_scores_far_above_and_below_a_rows_running_maximum(keys):
    # The kernel moves a row's maximum only where a score passes it by kSlack (2^8): keys whose scores grow
    # along the row make it move, block after block, and keys whose scores shrink leave later weights to
    # underflow. Either way the result is softmax's.
    torch.manual_seed(7)
    n = 300
    grow = torch.linspace(0.0, 100.0, n) if keys == "rising" else torch.linspace(100.0, 0.0, n)  # [n]
    q, v = torch.randn(9, n, 64), torch.randn(3, n, 64)
    # scores up to 100x their usual size: weights past float's 2^128 unless the maximum moves
    k = torch.randn(3, n, 64) * (1.0 + grow)[None, :, None]
    out = K.causal_attention(q, k, v, 0, 0.125)
    assert torch.isfinite(out).all()
    # scores this large lose digits in float32 whoever computes them: the bound is PyTorch's own float32 error
    ref = causal_reference(q, k, v, 0)
    torch_error = (F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True,
                                                  scale=0.125)[0].double() - ref).abs().max()
    assert (out.double() - ref).abs().max() <= 1.5 * torch_error


def test_causal_attention_gives_a_row_its_own_bits_in_chunks_and_alone():
    # a prompt scored in chunks (chunked prefill) attends exactly as scored whole
    torch.manual_seed(6)
    q, k, v = torch.randn(9, 300, 64), torch.randn(3, 300, 64), torch.randn(3, 300, 64)
    whole = K.causal_attention(q, k, v, 0, 0.125)
    for lo, hi in [(0, 100), (100, 290), (290, 291), (291, 300)]:
        part = K.causal_attention(q[:, lo:hi], k[:, :hi], v[:, :hi], lo, 0.125)
        assert torch.equal(part, whole[:, lo:hi])
    with pytest.raises(RuntimeError, match="start \\+ n keys"):
        K.causal_attention(q, k[:, :299], v[:, :299], 0, 0.125)
    with pytest.raises(RuntimeError, match="head_dim must be a multiple"):
        K.causal_attention(q[..., :24], k[..., :24], v[..., :24], 0, 0.125)


def test_a_threaded_kernel_call_leaves_the_compute_thread_its_torch_threads():
    """The kernels split big calls across the calling thread's own OpenMP
    threads; they once went through at::parallel_for, whose inline first-use
    init reset the server's compute thread to torch's process default of 1
    (compute.start), and every product after ran on one core."""
    from arserve.core import compute

    compute.executor()
    threads = compute.call(torch.get_num_threads)
    x, w = torch.randn(4096, 576), torch.randn(576)  # large enough to split across threads

    def run():
        fused.rms_norm(x, w, 1e-5)
        K.decode_attention(torch.randn(8, 9, 64), torch.randn(8, 3, 2048, 64), torch.randn(8, 3, 2048, 64), [2048] * 8, 0.125)
        return torch.get_num_threads()

    assert compute.call(run) == threads


def test_the_kernels_are_loaded_when_a_model_is_packed_not_by_its_first_request():
    """A server packs its models before it reports healthy, so no request
    pays for building or loading the kernels (issue 19: the first request
    after start is as warm as the tenth)."""
    from arserve.core.config import LlamaConfig
    from arserve.core.model import Llama

    fused.kernels.cache_clear()
    model = Llama(LlamaConfig.from_name("tiny")).init_random(0).eval()
    assert fused.kernels.cache_info().currsize == 0
    model.pack()
    assert fused.kernels.cache_info().currsize == 1 and fused.kernels() is not None
