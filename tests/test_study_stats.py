"""The study's confidence intervals: hierarchical bootstrap over seeds and prompts, and paired differences."""
import numpy as np
import pytest

from longctx.pipeline.study.stats import estimate, paired_difference

pytestmark = pytest.mark.timeout(120)


def test_a_constant_score_has_a_zero_width_interval_at_its_value():
    e = estimate({0: [1.0] * 40, 1: [1.0] * 40})
    assert (e.mean, e.ci_low, e.ci_high, e.n, e.n_seeds) == (1.0, 1.0, 1.0, 80, 2)


def test_the_interval_holds_the_true_rate_about_95_times_in_100():
    """Five seeds of 40 prompts, each seed's rate drawn around 0.7 (seeds differ), each prompt Bernoulli: the
    95% interval covers the population mean in 88-99% of 200 studies (binomial spread of a 95% coverage)."""
    rng = np.random.default_rng(1)
    covered = 0
    for study in range(200):
        rates = np.clip(rng.normal(0.7, 0.08, size=5), 0, 1)
        data = {s: (rng.random(40) < r).astype(float) for s, r in enumerate(rates)}
        e = estimate(data, seed=study, replicates=400)
        covered += e.ci_low <= 0.7 <= e.ci_high
    assert 176 <= covered <= 198, covered


def test_spread_between_seeds_widens_the_interval():
    """The same prompt-level spread, once with every seed alike and once with seeds far apart: the interval
    must carry the seeds' spread (a prompts-only bootstrap would not)."""
    rng = np.random.default_rng(2)
    alike = {s: (rng.random(40) < 0.6).astype(float) for s in range(5)}
    apart = {s: (rng.random(40) < r).astype(float) for s, r in enumerate([0.2, 0.4, 0.6, 0.8, 1.0])}
    width = lambda e: e.ci_high - e.ci_low
    assert width(estimate(apart)) > 1.5 * width(estimate(alike))


def test_the_mean_is_over_every_prompt_and_the_interval_is_reproducible():
    data = {0: [1, 0, 1, 1], 3: [0, 0, 1, 0, 1, 1]}
    e = estimate(data, seed=5)
    assert e.mean == pytest.approx(6 / 10) and e.ci_low <= e.mean <= e.ci_high
    assert estimate(data, seed=5) == e
    assert 0.0 <= e.ci_low < e.ci_high <= 1.0


def test_a_paired_difference_removes_what_the_prompts_share():
    """A variant that scores exactly 0.1 more on every prompt: the difference is 0.1 with no spread, although
    the prompts themselves vary widely."""
    rng = np.random.default_rng(3)
    base = {s: rng.random(40) * 0.8 for s in range(3)}
    better = {s: v + 0.1 for s, v in base.items()}
    d = paired_difference(better, base)
    assert d.mean == pytest.approx(0.1) and d.ci_low == pytest.approx(0.1) and d.ci_high == pytest.approx(0.1)


def test_a_difference_of_unpaired_results_is_refused():
    with pytest.raises(ValueError, match=r"seeds \[0, 1\], the baseline \[0\]"):
        paired_difference({0: [1.0], 1: [1.0]}, {0: [0.0]})
    with pytest.raises(ValueError, match="seed 0 has 2 prompts in the variant and 1 in the baseline"):
        paired_difference({0: [1.0, 0.0]}, {0: [0.0]})


@pytest.mark.parametrize("data,match", [({}, "no seeds"), ({0: []}, "seed 0 has no values"),
                                        ({0: [1.0, float("nan")]}, "seed 0 has a value that is not finite")])
def test_empty_or_broken_results_are_errors(data, match):
    with pytest.raises(ValueError, match=match):
        estimate(data)
