"""The varlen attention path of packed GPT-J rows (dolly/models/varlen.py), on CPU with a reference
kernel injected in place of the CUDA ones: a loop over the segments with torch's
scaled_dot_product_attention(is_causal=True), called with varlen_attn's signature.

Tiny GPT-J in fp32, eval mode, use_cache False (as training calls it):
- segment boundaries read from position_ids, as literal lists;
- each record of a packed row has, through the varlen class, the loss it has alone (<= 1e-5),
  the kernel ran once per layer per forward, and the labelled-only training loss and every
  gradient equal eager attention's on the same packed batch;
- right-padded batches with plain positions: the real positions' logits equal eager's;
- where the segments do not reproduce eager's mask (left padding with plain positions) or with a
  cache (generation), the eager parent runs: same logits, same greedy tokens, no kernel call;
- `enable` on CPU without a kernel returns None and changes nothing; `disable` restores.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPTJConfig, GPTJForCausalLM
from transformers.models.gptj.modeling_gptj import GPTJAttention

from dolly.data.collator import IGNORE_INDEX, CompletionCollator
from dolly.data.packing import PackingCollator
from dolly.models import labelled_loss, varlen

pytestmark = pytest.mark.timeout(300)
VOCAB, MAX_LENGTH, EOS, RESP, LAYERS = 300, 64, 299, 298, 2
seen_max: list[int] = []  # the max_q of each reference-kernel call


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                     window_size=(-1, -1)):
    """varlen_attn's contract on CPU: query/key/value `(total_tokens, heads, head_dim)`, each
    segment [cu[i], cu[i+1]) attending causally to itself only."""
    assert tuple(window_size) == (-1, 0) and torch.equal(cu_seq_q, cu_seq_k)
    assert cu_seq_q.dtype == torch.int32 and max_q == max_k
    bounds = cu_seq_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == query.shape[0]
    assert max_q == max(b - a for a, b in zip(bounds, bounds[1:]))
    seen_max.append(max_q)
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        q, k, v = (t[a:b].transpose(0, 1) for t in (query, key, value))  # (heads, n, dim)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        pieces.append(out.transpose(0, 1))
    return torch.cat(pieces)


def records(n_records=10, seed=0):
    """Token-id records (Dolly-style: the token before the response is the response key)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_records):
        n = MAX_LENGTH if k == 0 else int(rng.integers(6, 40))
        ids = rng.integers(0, VOCAB - 2, size=n).tolist()
        start = n - 1 if k == 1 else int(rng.integers(2, n - 1))
        ids[start - 1] = RESP
        out.append({"input_ids": ids, "response_start": start})
    return out


def tiny_gptj():
    torch.manual_seed(0)
    cfg = GPTJConfig(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=LAYERS, n_head=4,
                     rotary_dim=8, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=0)
    model = GPTJForCausalLM(cfg)
    model.config.use_cache = False  # as training sets it (GPT-J's own default is True)
    return model.eval()


@pytest.fixture
def models():
    """(eager, varlen): the same weights; the second's attention through reference_varlen."""
    eager, fast = tiny_gptj(), tiny_gptj()
    assert varlen.enable(fast, kernel=reference_varlen) == "reference_varlen"
    return eager, fast


@pytest.fixture(scope="module")
def packed():
    batch = PackingCollator(0, RESP, MAX_LENGTH)(records())
    for k in ("num_real_tokens", "num_records"):
        batch.pop(k)
    return batch


def per_record(model, batch):
    """Each record's mean loss over its labelled tokens, read off the packed batch's logits; a
    record starts where its position id is 0 (the padding tail has no labels)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    target = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    pos, out = batch["position_ids"], []
    for r in range(pos.shape[0]):
        starts = (pos[r] == 0).nonzero().flatten().tolist() + [pos.shape[1]]
        for a, b in zip(starts, starts[1:]):
            if (target[r, a:b] != IGNORE_INDEX).any():
                out.append((tuple(batch["input_ids"][r, a:b].tolist()),
                            F.cross_entropy(logits[r, a:b].float(), target[r, a:b],
                                            ignore_index=IGNORE_INDEX).item()))
    return out


def alone(model, ids: tuple, start: int) -> float:
    b = CompletionCollator(0, RESP)([{"input_ids": list(ids), "response_start": start}])
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"]).logits
    return F.cross_entropy(logits[0, :-1].float(), b["labels"][0, 1:],
                           ignore_index=IGNORE_INDEX).item()


def test_segments_start_at_every_position_zero_and_every_row():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 0, 0, 1]])
    cu, longest = varlen.segments(pos)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 7, 11, 12, 14] and longest == 4
    cu, longest = varlen.segments(torch.tensor([[3, 4, 0, 1, 2], [0, 1, 2, 3, 4]]))
    assert cu.tolist() == [0, 2, 5, 10] and longest == 5  # a row always starts a segment


def test_packed_records_have_their_loss_alone_through_the_kernel(models, packed):
    eager, fast = models
    assert packed["input_ids"].shape[0] < 10  # rows really hold several records
    starts = {tuple(f["input_ids"]): f["response_start"] for f in records()}
    before = varlen.calls()
    got = per_record(fast, packed)
    assert varlen.calls() - before == LAYERS  # one kernel call per layer: no eager fallback
    assert seen_max[-1] == MAX_LENGTH  # the longest segment: the record of max_length tokens
    assert sorted(ids for ids, _ in got) == sorted(starts)
    diff = max(abs(loss - alone(eager, ids, starts[ids])) for ids, loss in got)
    assert diff <= 1e-5


def test_labelled_loss_and_gradients_equal_eager_on_packed_rows(models, packed):
    eager, fast = models
    results = []
    for model in (eager, fast):
        assert labelled_loss.install(model)
        model.zero_grad(set_to_none=True)
        loss = model(**packed).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        labelled_loss.uninstall(model)
    (l_eager, g_eager), (l_fast, g_fast) = results
    assert abs(l_eager - l_fast) <= 1e-5
    for name, g in g_eager.items():
        torch.testing.assert_close(g_fast[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_right_padded_batch_gives_eager_logits_at_real_positions(models):
    eager, fast = models
    feats = records(4, seed=1)
    b = CompletionCollator(0, RESP)(feats)
    before = varlen.calls()
    with torch.no_grad():
        want = eager(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        got = fast(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert varlen.calls() - before == LAYERS
    real = b["attention_mask"].bool()
    assert real.sum() < real.numel()  # there is padding
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_inference_mode_without_a_cache_runs_the_kernel(models, packed):
    eager, fast = models
    call = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    before = varlen.calls()
    with torch.inference_mode():
        want, got = eager(**call).logits, fast(**call).logits
    assert varlen.calls() - before == LAYERS
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_left_padding_with_plain_positions_falls_back_to_eager(models):
    eager, fast = models
    ids = torch.randint(0, VOCAB - 2, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, positions 0..11 (no position_ids): a real token would see
    before = varlen.calls()  # the padding in one causal segment, so eager must run
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask).logits
        got = fast(input_ids=ids, attention_mask=mask).logits
    assert varlen.calls() == before
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


def test_generation_with_a_cache_runs_eager_and_gives_the_same_tokens(models):
    eager, fast = models
    prompt = torch.tensor([[5, 17, 42, 99, 7], [0, 0, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    before = varlen.calls()
    call = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True,
                pad_token_id=0)
    want = eager.generate(prompt, **call)
    got = fast.generate(prompt, **call)
    assert varlen.calls() == before  # every step had a cache: the eager parent
    assert got.tolist() == want.tolist()


def test_a_half_only_kernel_gets_bf16_from_an_fp32_model_and_returns_fp32(models, packed):
    eager, fast = models
    dtypes = []

    def half_kernel(query, key, value, *args, **kwargs):
        dtypes.append((query.dtype, key.dtype, value.dtype))
        return reference_varlen(query, key, value, *args, **kwargs)

    for block in fast.transformer.h:  # as find_kernel's CUDA kernels are marked
        block.attn.varlen_kernel = varlen.Kernel("half", half_kernel, half_only=True)
    call = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    with torch.no_grad():
        want, got = eager(**call).logits, fast(**call).logits
    assert dtypes == [(torch.bfloat16,) * 3] * LAYERS and got.dtype == torch.float32
    assert 0 < (got - want).abs().max() < 0.1  # bf16 attention arithmetic, same records


def test_enable_without_a_kernel_on_cpu_changes_nothing():
    model = tiny_gptj()
    assert not torch.cuda.is_available()
    with pytest.raises(LookupError, match="no CUDA"):
        varlen.find_kernel(16)
    assert varlen.enable(model) is None
    assert varlen.enabled(model) is None
    assert all(type(block.attn) is GPTJAttention for block in model.transformer.h)


def test_enable_and_disable_swap_every_block_and_keep_the_weights(models):
    _, fast = models
    state = {k: v.clone() for k, v in fast.state_dict().items()}
    assert varlen.enabled(fast) == "reference_varlen"
    assert all(type(block.attn) is varlen.VarlenGPTJAttention for block in fast.transformer.h)
    assert varlen.disable(fast) and varlen.enabled(fast) is None
    assert all(type(block.attn) is GPTJAttention for block in fast.transformer.h)
    assert all(torch.equal(v, state[k]) for k, v in fast.state_dict().items())


def test_enable_refuses_other_architectures():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4))
    assert varlen.enable(llama, kernel=reference_varlen) is None


def test_enable_reaches_through_a_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gptj(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert varlen.enable(model, kernel=reference_varlen) == "reference_varlen"
    inner = labelled_loss.inner_model(model)
    assert all(type(block.attn) is varlen.VarlenGPTJAttention for block in inner.transformer.h)
