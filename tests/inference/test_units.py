"""KV cache, exit policies and sampling filters on hand-computed numbers."""
import math

import pytest
import torch

from nemo_ee.inference.kv_cache import KVCache
from nemo_ee.inference.policies import ExitRule, check_threshold, confidence
from nemo_ee.inference.sampling import SamplingParams, probabilities


def test_kv_cache_update_read_truncate():
    cache = KVCache(["a", "b"], batch_size=2, capacity=5, groups=1, head_dim=2)
    k = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])
    cache.update("a", torch.tensor([1, 1]), torch.tensor([0, 3]), k, -k)
    keys, values = cache.read("a", torch.tensor([1]), 4)
    assert keys.shape == (1, 1, 4, 2)
    assert keys[0, 0].tolist() == [[1, 2], [0, 0], [0, 0], [3, 4]] and torch.equal(values, -keys)
    assert cache.k["a"][0].abs().sum() == 0 and cache.k["b"].abs().sum() == 0
    cache.length["a"][1], cache.length["b"][1] = 4, 2
    cache.truncate(1, 3)
    assert cache.length["a"] == [0, 3] and cache.length["b"] == [0, 2]
    with pytest.raises(ValueError, match="position 5 is outside the cache capacity 5"):
        cache.update("a", torch.tensor([0]), torch.tensor([5]), k[:1], k[:1])


def test_policy_statistics():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [1.0, 1e-12, 1e-12]]))
    assert torch.allclose(confidence("max_prob", logits), torch.tensor([0.5, 1.0]))
    assert torch.allclose(confidence("top2_margin", logits), torch.tensor([0.2, 1.0]), atol=1e-6)
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert torch.allclose(confidence("entropy", logits)[0], torch.tensor(h))
    assert ExitRule("max_prob", 0.5).fires(logits).tolist() == [True, True]
    assert ExitRule("max_prob", 0.51).fires(logits).tolist() == [False, True]
    assert ExitRule("entropy", 0.01).fires(logits).tolist() == [False, True]
    assert ExitRule("top2_margin", 0.3).fires(logits).tolist() == [False, True]
    assert ExitRule("max_prob", 1.01).fires(logits).tolist() == [False, False]
    assert ExitRule(forced=2).uses(2) and not ExitRule(forced=2).uses(1)
    assert not ExitRule.full().uses(0)


@pytest.mark.parametrize("policy,threshold,message", [
    ("max_prob", -0.1, r"early_exit_threshold -0.1 is outside the range of 'max_prob': a finite number >= 0"),
    ("entropy", float("nan"), r"early_exit_threshold nan is outside the range of 'entropy'"),
    ("max_prob", "high", r"early_exit_threshold 'high' is not a number"),
    ("confidence", 0.5, r"exit_policy 'confidence' is not one of \['max_prob', 'entropy', 'top2_margin'\]"),
])
def test_bad_thresholds(policy, threshold, message):
    with pytest.raises(ValueError, match=message):
        check_threshold(policy, threshold)


def test_sampling_filters():
    logits = torch.log(torch.tensor([0.1, 0.4, 0.2, 0.3]))
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([0.0, 4 / 7, 0.0, 3 / 7]))
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.65))  # 0.4 + 0.3 >= 0.65
    assert torch.allclose(p, torch.tensor([0.0, 4 / 7, 0.0, 3 / 7]))
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.75))
    assert torch.allclose(p, torch.tensor([0.0, 4 / 9, 2 / 9, 3 / 9]))
    assert probabilities(logits, SamplingParams()).tolist() == [0, 1, 0, 0]
    for bad, message in ((dict(temperature=-1.0), "temperature=-1.0 must be a finite number >= 0"),
                         (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
                         (dict(top_k=-2), "top_k=-2 must be an integer >= 0")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(**bad)
