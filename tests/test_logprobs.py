"""The one log-prob kernel: plain logits, the chunked lean head and the model forward agree with a
hand computation on a tiny random Llama, values and gradients."""

import math

import pytest
import torch
from comalkit_plugins.models.tiny import tiny_causal_lm

from comalkit.lm.logprobs import lm_sequence_logps, sequence_logps, token_logps

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three right-padded rows of random ids with responses of different spans (one ends at the pad)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    attention = torch.ones_like(ids)
    response = torch.zeros_like(ids)
    for row, (start, end) in enumerate([(4, 12), (2, 7), (9, 10)]):
        response[row, start:end] = 1
        attention[row, end:] = 0
    return ids, attention, response


def hand_logps(logits: torch.Tensor, ids: torch.Tensor, response: torch.Tensor) -> list[float]:
    """Σ over response tokens t of logit[t-1, y_t] − log Σ_v exp(logit[t-1, v]), in float64 Python."""
    out = []
    for b in range(len(ids)):
        total = 0.0
        for t in range(1, ids.shape[1]):
            if response[b, t]:
                row = logits[b, t - 1].double().tolist()
                total += row[int(ids[b, t])] - math.log(sum(math.exp(v) for v in row))
        out.append(total)
    return out


@pytest.fixture
def model():
    model, _ = tiny_causal_lm(seed=3)
    return model.eval()


def test_token_logps_is_the_log_softmax_at_the_labels():
    logits = torch.randn(4, 7, dtype=torch.bfloat16)
    labels = torch.tensor([0, 6, 3, 3])
    got = token_logps(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, logits.float().log_softmax(-1)[torch.arange(4), labels])


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_head_equals_plain_logits_and_a_hand_computation(model, chunk):
    ids, attention, response = batch(model.config.vocab_size)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state
    hidden.requires_grad_(True)
    head = model.get_output_embeddings()
    logits = head(hidden)
    mask = response[:, 1:]
    plain, counts = sequence_logps(logits[:, :-1], ids[:, 1:], mask)
    lean, lean_counts = sequence_logps(hidden[:, :-1], ids[:, 1:], mask, head=head, chunk=chunk)
    expected = torch.tensor(hand_logps(logits.detach(), ids, response), dtype=torch.float32)
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(lean, plain, atol=1e-5, rtol=1e-6)
    assert counts.tolist() == lean_counts.tolist() == [8, 5, 1]
    # the recomputed head gives the same gradients to the head and the hidden states
    weights = torch.tensor([1.0, -0.5, 2.0])
    grads = [torch.autograd.grad((v * weights).sum(), [head.weight, hidden]) for v in (plain, lean)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("lean", "keeps_logits"), [(False, False), (False, True), (True, False)])
def test_model_forward_scores_only_the_response(model, lean, keeps_logits):
    ids, attention, response = batch(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
        summed, counts = lm_sequence_logps(
            model, ids, attention, response, lean=lean, keeps_logits=keeps_logits, chunk=3
        )
    torch.testing.assert_close(summed, torch.tensor(hand_logps(logits, ids, response)), atol=1e-5, rtol=1e-6)
    assert counts.tolist() == [8, 5, 1]


@pytest.mark.parametrize("lean", [False, True])
def test_no_response_tokens_score_zero(model, lean):
    ids, attention, _ = batch(model.config.vocab_size)
    summed, counts = lm_sequence_logps(model, ids, attention, torch.zeros_like(ids), lean=lean)
    assert summed.tolist() == [0.0, 0.0, 0.0] and counts.tolist() == [0, 0, 0]


def test_a_chunk_below_one_is_refused_before_any_work():
    with pytest.raises(ValueError, match="chunk=0"):
        sequence_logps(torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), chunk=0)
