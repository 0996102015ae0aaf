"""masked_softmax against the authors' formula written out element by element."""
from __future__ import annotations

import math

import pytest
import torch

from leanvit.ops.attention import masked_softmax


def _reference(logits, keep, eps=1e-6):
    B, H, N, _ = logits.shape
    out = torch.empty_like(logits, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                row = logits[b, h, i].double()
                m = row.max()
                w = [math.exp(row[j] - m) * (1.0 if j == i else float(keep[b, j]))
                     for j in range(N)]
                s = sum(w)
                for j in range(N):
                    out[b, h, i, j] = (w[j] + eps / N) / (s + eps)
    return out


def test_masked_softmax_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5)
    keep = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 0, 1]], dtype=torch.float32)
    got = masked_softmax(logits, keep)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference(logits, keep), atol=1e-6, rtol=1e-5)


def test_all_kept_is_plain_softmax_and_gradient_reaches_mask():
    logits = torch.randn(1, 2, 4, 4)
    keep = torch.ones(1, 4, requires_grad=True)
    got = masked_softmax(logits, keep)
    torch.testing.assert_close(got, logits.softmax(-1), atol=1e-5, rtol=1e-5)
    (got[..., 1] * torch.arange(4.0)).sum().backward()
    assert keep.grad is not None and keep.grad.abs().sum() > 0


# -- the one attention function (leanvit.ops.attention.attention)


def _plain(q, k, v, scale, bias=None):
    """Attention written out per image and head in float64: softmax(q k^T * scale + bias) v."""
    B, H, Nq, D = q.shape
    out = torch.empty(B, H, Nq, v.shape[-1], dtype=torch.float64)
    maps = torch.empty(B, H, Nq, k.shape[2], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            logits = q[b, h].double() @ k[b, h].double().T * scale
            if bias is not None:
                logits = logits + bias[b, 0].double()
            a = logits.softmax(-1)
            maps[b, h] = a
            out[b, h] = a @ v[b, h].double()
    return out, maps


def test_attention_forms_agree_with_a_plain_reference():
    from leanvit.ops.attention import attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    bias = torch.randn(2, 1, 1, 6).clamp_min(-1).log1p()  # like log(size)
    scale = 8 ** -0.5
    ref, ref_maps = _plain(q, k, v, scale, bias)
    fused = attention(q, k, v, scale, bias=bias)
    explicit, maps = attention(q, k, v, scale, bias=bias, fused=False, return_weights=True)
    torch.testing.assert_close(fused.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps.double(), ref_maps, atol=1e-6, rtol=1e-5)
    # query rows: the selected rows of the full result
    rows = torch.tensor([[0, 2, 5], [1, 3, 4]])
    sel = attention(q, k, v, scale, bias=bias, rows=rows)
    want = torch.stack([ref[b][:, rows[b]] for b in range(2)])
    torch.testing.assert_close(sel.double(), want, atol=1e-5, rtol=1e-5)
    # an all-ones keep-mask: the eps-softmax, fp32, close to the plain result
    masked = attention(q, k, v, scale, bias=bias, keep=torch.ones(2, 6))
    torch.testing.assert_close(masked.double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot be combined"):
        attention(q, k, v, scale, keep=torch.ones(2, 6), rows=rows)


def test_explicit_form_is_timm_attention_bit_for_bit():
    """fused=False follows timm's non-fused op order exactly; fused=True is timm's SDPA call."""
    import timm.layers

    from leanvit.ops.attention import attention

    torch.manual_seed(0)
    for fused in (True, False):
        attn = timm.layers.Attention(24, num_heads=3).eval()
        attn.fused_attn = fused
        x = torch.randn(2, 7, 24)
        want = attn(x)
        B, N, C = x.shape
        q, k, v = attn.qkv(x).reshape(B, N, 3, 3, 8).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, attn.scale, fused=fused, dropout=attn.attn_drop)
        got = attn.proj(out.transpose(1, 2).reshape(B, N, C))
        assert torch.equal(got, want)


def test_masked_softmax_with_query_rows_matches_the_square_form():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 5, 5)
    keep = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 0, 1]], dtype=torch.float32)
    full = masked_softmax(logits, keep)
    rows = torch.tensor([[0, 3], [4, 1]])
    sub = torch.stack([logits[b][:, rows[b]] for b in range(2)])
    got = masked_softmax(sub, keep, rows=rows)
    want = torch.stack([full[b][:, rows[b]] for b in range(2)])
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)


def test_several_biases_are_added_in_order():
    from leanvit.ops.attention import attention, attention_logits

    torch.manual_seed(2)
    q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    b1, b2 = torch.randn(1, 2, 5, 5), torch.randn(2, 1, 1, 5)
    want = ((q * 0.5) @ k.transpose(-2, -1) + b1) + b2
    assert torch.equal(attention_logits(q, k, 0.5, (b1, None, b2)), want)
    total = b1 + b2  # [2, 2, 5, 5]
    expect = torch.stack([torch.stack([
        ((q[b, h].double() @ k[b, h].double().T) * 0.5 + total[b, h].double()).softmax(-1)
        @ v[b, h].double() for h in range(2)]) for b in range(2)])
    for fused in (True, False):
        got = attention(q, k, v, 0.5, bias=(b1, b2), fused=fused)
        torch.testing.assert_close(got.double(), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape, dtype, explicit", [
    ((1, 50), torch.float32, True),  # 60 kB map: explicit form in compiled CPU code
    ((8, 200), torch.float32, False),  # 7.7 MB map: the fused kernel
    ((1, 50), torch.bfloat16, False),  # half precision keeps the kernel (float32 softmax)
])
def test_compiled_cpu_form_depends_on_the_map_size(shape, dtype, explicit):
    """Which form compiled CPU code traces (``EXPLICIT_MAX_BYTES``), read from the captured
    graph, and that both forms give the eager (fused) result."""
    import torch.nn.functional as F

    from leanvit.ops.attention import EXPLICIT_MAX_BYTES, attention

    B, N = shape
    if dtype == torch.float32:  # the float32 cases lie on either side of the limit
        assert (B * 6 * N * N * 4 <= EXPLICIT_MAX_BYTES) == explicit
    g = torch.Generator().manual_seed(N)
    q, k, v = (t.to(dtype) for t in torch.randn(3, B, 6, N, 64, generator=g).unbind(0))
    bias = torch.randn(B, 1, 1, N, generator=g).to(dtype)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    run = torch.compile(lambda q, k, v, b: attention(q, k, v, 64 ** -0.5, bias=b),
                        backend=backend, fullgraph=True)
    out = run(q, k, v, bias)
    fused = any(n.target is F.scaled_dot_product_attention for gm in graphs
                for n in gm.graph.nodes)
    assert fused != explicit
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, attention(q, k, v, 64 ** -0.5, bias=bias), **tol)


@pytest.mark.parametrize("kernel", ["flex", "sdpa"])
def test_compiled_key_bias_kernels_equal_the_plain_reference(kernel, monkeypatch):
    """A per-key bias (``log(size)`` and ``-inf`` padding) in compiled code, served by
    FlexAttention's ``score_mod`` or by SDPA with a float mask (``KEY_BIAS_KERNEL``), equals the
    float64 reference; the graph holds the kernel asked for; query rows too."""
    import leanvit.ops.attention as A

    monkeypatch.setattr(A, "KEY_BIAS_KERNEL", kernel)
    g = torch.Generator().manual_seed(3)
    B, N = 8, 96  # 1.2 MB map: above EXPLICIT_MAX_BYTES, so a kernel serves it
    assert B * 4 * (N - 8) * N * 4 > A.EXPLICIT_MAX_BYTES
    q, k, v = torch.randn(3, B, 4, N, 16, generator=g).unbind(0)
    size = torch.randint(1, 5, (B, N), generator=g).float()
    bias = size.log()
    bias[1, -7:] = float("-inf")  # padding: those keys get no weight
    bias = bias[:, None, None, :]
    rows = torch.stack([torch.randperm(N, generator=g)[:N - 8] for _ in range(B)])
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    run = torch.compile(lambda q, k, v, b, r: A.attention(q, k, v, 0.25, bias=b, rows=r),
                        backend=backend, fullgraph=True)
    ref, _ = _plain(q, k, v, 0.25, bias)
    torch.testing.assert_close(run(q, k, v, bias, None).double(), ref, atol=1e-5, rtol=1e-5)
    want = torch.stack([ref[b][:, rows[b]] for b in range(B)])
    torch.testing.assert_close(run(q, k, v, bias, rows).double(), want, atol=1e-5, rtol=1e-5)
    text = "\n".join(str(gm.graph) for gm in graphs)
    assert ("flex_attention" in text) == (kernel == "flex")
    assert ("scaled_dot_product_attention" in text) == (kernel == "sdpa")


def test_key_bias_takes_only_per_key_biases():
    from leanvit.ops.attention import key_bias

    q, k = torch.zeros(2, 3, 5, 4), torch.zeros(2, 3, 7, 4)
    a, b = torch.randn(2, 1, 1, 7), torch.randn(1, 1, 1, 7)
    torch.testing.assert_close(key_bias((a, None, b), q, k), (a + b)[:, 0, 0])
    assert key_bias(None, q, k) is None
    assert key_bias(torch.randn(1, 3, 5, 7), q, k) is None  # relative position: per head/row
    assert key_bias(torch.randn(1, 1, 5, 7), q, k) is None


@pytest.mark.parametrize("chunk_bytes", [1, 2 * 2 * 5 * 5 * 8, 1 << 30])
def test_map_attention_in_chunks_is_the_explicit_attention(monkeypatch, chunk_bytes):
    """Chunks of 1, 2 (uneven: 2 + 1) and all 3 images: the same output as the whole-batch
    explicit form, and ``read`` sees each image's map once, with a per-image bias sliced and a
    shared one kept."""
    import leanvit.ops.attention as attention_ops
    from leanvit.ops.attention import attention, map_attention

    monkeypatch.setattr(attention_ops, "MAP_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    bias = [torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64),
            torch.randn(3, 1, 1, 5, generator=g, dtype=torch.float64)]
    ref, weights = attention(q, k, v, 0.5, bias=bias, fused=False, return_weights=True)
    seen = []

    def read(w, images):
        seen.append(images)
        return w.sum(dim=2)

    out, reads = map_attention(q, k, v, 0.5, read, bias=bias)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reads, weights.sum(dim=2), rtol=1e-12, atol=1e-12)
    assert sum(len(range(3)[s]) for s in seen) == 3
    assert len(seen) == {1: 3, 2 * 2 * 5 * 5 * 8: 2, 1 << 30: 1}[chunk_bytes]


@pytest.mark.parametrize("chunk_bytes,chunks", [(1, 15), (2 * 5 * 8 * 2, 9), (2 * 5 * 8 * 10, 2),
                                                (1 << 30, 1)])
def test_received_attention_in_row_chunks_is_the_mean_of_the_map(monkeypatch, chunk_bytes,
                                                                 chunks):
    """One row, groups of two rows (2 + 2 + 1 per image), two images (2 + 1) and the whole
    batch per chunk: the explicit attention's output, and its map averaged over heads and
    query rows, with a per-image per-key bias sliced by image, a shared per-row bias sliced by
    row and a per-image per-row bias (a callable of the images) sliced by both."""
    import leanvit.ops.attention as attention_ops
    from leanvit.ops.attention import attention, received_attention

    monkeypatch.setattr(attention_ops, "MAP_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    shared_rows = torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64)
    per_key = torch.randn(3, 1, 1, 5, generator=g, dtype=torch.float64)
    per_image_rows = torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64)
    bias = [shared_rows, per_key, per_image_rows]
    ref, weights = attention(q, k, v, 0.5, bias=bias, fused=False, return_weights=True)
    asked = []

    def lookup(images):
        asked.append(images)
        return [shared_rows, per_key[images], per_image_rows[images]]

    out, received = received_attention(q, k, v, 0.5, bias=lookup)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(received, weights.mean(dim=(1, 2)), rtol=1e-12, atol=1e-12)
    assert len(asked) == chunks
    out2, received2 = received_attention(q, k, v, 0.5, bias=bias)  # the same, as tensors
    torch.testing.assert_close(out2, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(received2, received, rtol=1e-12, atol=1e-12)


def test_chunked_map_reads_keep_gradients(monkeypatch):
    """While autograd records, the chunks' outputs are concatenated (no buffer written in
    place): the same output, and gradients reach q, k and v as through the explicit form."""
    import leanvit.ops.attention as attention_ops
    from leanvit.ops.attention import attention, map_attention, received_attention

    monkeypatch.setattr(attention_ops, "MAP_CHUNK_BYTES", 2 * 5 * 8 * 2)  # row groups of 2
    g = torch.Generator().manual_seed(1)
    leaves = [torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64).requires_grad_()
              for _ in range(3)]
    ref = attention(*leaves, 0.5, fused=False)
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    for fn in (lambda q, k, v: received_attention(q, k, v, 0.5),
               lambda q, k, v: map_attention(q, k, v, 0.5, lambda w, im: w.sum(dim=2))):
        out, _ = fn(*leaves)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
