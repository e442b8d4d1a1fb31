"""One-run canary auditing refuses scores and settings that would give a silent ε_lower = 0."""

import math

import pytest
import torch

from opacus_dmaudit.privacy.canaries import Canaries, one_run_epsilon_lower


def _canaries(m: int = 40) -> Canaries:
    return Canaries(torch.rand(m, 1, 8, 8), torch.randint(0, 10, (m,)), seed=1)


@pytest.mark.parametrize(
    "bad,message",
    [
        (math.nan, r"scores of canaries \[3\] are NaN or infinite"),
        (math.inf, r"scores of canaries \[3\] are NaN or infinite"),
        (-math.inf, r"scores of canaries \[3\] are NaN or infinite"),
    ],
)
def test_non_finite_scores_are_refused(bad, message):
    canaries = _canaries()
    scores = torch.linspace(-1, 1, len(canaries))
    scores[3] = bad
    with pytest.raises(ValueError, match=message):
        canaries.audit(scores, delta=1e-5)


def test_constant_scores_are_refused():
    canaries = _canaries()
    with pytest.raises(ValueError, match="constant scores cannot rank the canaries"):
        canaries.audit(torch.full((len(canaries),), 0.25), delta=1e-5)


@pytest.mark.parametrize("confidence", [1.5, 1.0, 0.0, -0.1, math.nan, "0.95", True])
def test_a_confidence_outside_0_1_is_refused(confidence):
    canaries = _canaries()
    with pytest.raises(ValueError, match=r"confidence must be a probability in \(0, 1\)"):
        canaries.audit(torch.linspace(-1, 1, len(canaries)), delta=1e-5, confidence=confidence)
    with pytest.raises(ValueError, match=r"confidence must be a probability in \(0, 1\)"):
        one_run_epsilon_lower(
            canaries=100, guesses=20, correct=20, delta=1e-5, confidence=confidence
        )


def test_scores_that_separate_the_canaries_still_give_a_bound():
    canaries = _canaries(200)
    scores = canaries.included.double() + 0.01 * torch.arange(200).double() / 200
    result = canaries.audit(scores, delta=1e-5)
    assert result["epsilon_lower"] > 0 and result["correct"] == result["guesses"]
