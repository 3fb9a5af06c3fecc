"""Judging a figure of one run against the same figure of another, by their samples.

One judge serves the release gate (a run against a baseline record) and the same-host A/B mode (build
or setting B against A): a one-sided Mann-Whitney U test on the two runs' samples (is the run worse?
is it better?) at ``alpha``, together with a minimum effect size, as Firecracker's A/B tooling pairs a
permutation test with a noise threshold. A shift counts only when it is both significant and at least
``min_effect``: a run's rounds agree closely with each other while two runs on one host can differ by
more (host memory state), so significance alone would flag that too, and a large change in a median
of a few rounds alone cannot be told from it.

Effect sizes are "how much worse" in the figure's own direction: for a figure where lower is better,
``run / baseline - 1``; where higher is better (a rate), ``baseline / run - 1``; so 25% means a quarter
slower either way, and a rate at a third of the baseline is +200%, as is a time three times as long.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_ALPHA = 0.01
# The verdicts that pass (the gate's and A/B's): every other one fails.
PASSING_VERDICTS = ("unchanged", "improved")


def median(samples: Sequence[float]) -> float:
    """The median (the mean of the middle two of an even count)."""
    s = sorted(samples)
    if not s:
        raise ValueError("median of no samples")
    mid = len(s) // 2
    return float(s[mid]) if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def percentile(samples: Sequence[float], q: float) -> float:
    """The sample at quantile ``q`` (0..1) by the nearest rank below: p99 of 200 samples is the 198th."""
    s = sorted(samples)
    if not s:
        raise ValueError("percentile of no samples")
    return float(s[min(len(s) - 1, int(q * len(s)))])


def parse_percent(text: str | float | int) -> float:
    """'25%' -> 0.25 (a policy's effect sizes are percentages)."""
    if isinstance(text, str) and text.endswith("%"):
        return float(text[:-1]) / 100
    raise ValueError(f"{text!r} is not a percentage such as '25%'")


def smallest_p(n: int, m: int) -> float:
    """The smallest one-sided p-value a rank test can give for n and m samples: every one of one side
    beyond every one of the other, 1 / C(n+m, n). A figure with fewer rounds than that needs can never be
    judged at ``alpha`` (3 rounds against 3: 0.05)."""
    return 1 / math.comb(n + m, n)


@dataclass(frozen=True)
class Judgement:
    """The verdict on one figure: ``regressed`` and ``implausible`` fail; ``improved``, ``unchanged`` pass;
    ``unjudgeable`` (too few samples to reach ``alpha``) fails, since it proves nothing."""

    verdict: str
    base_median: float
    run_median: float
    worse_by: float        # relative worsening in the figure's direction; negative: how much better, alike
    p_worse: float         # one-sided Mann-Whitney p that the run is worse
    p_better: float        # ... that it is better
    n_base: int
    n_run: int
    min_effect: float
    alpha: float

    @property
    def ok(self) -> bool:
        return self.verdict in PASSING_VERDICTS

    @property
    def p(self) -> float:
        """The p-value of the direction the medians moved."""
        return self.p_worse if self.worse_by >= 0 else self.p_better

    @property
    def change(self) -> float:
        """run / baseline - 1 of the medians, signed as the figure moves (not by what is better)."""
        return self.run_median / self.base_median - 1 if self.base_median else math.inf

    def reason(self) -> str:
        """Why the verdict, in words a release engineer reads."""
        effect = f"{self.min_effect:.0%}"
        if self.verdict == "unjudgeable":
            return (f"{self.n_run} samples against {self.n_base} cannot reach p < {self.alpha:g} "
                    f"(at best p = {smallest_p(self.n_base, self.n_run):.3g}): more rounds are needed")
        if self.verdict == "regressed":
            return f"worse by {self.worse_by:+.1%} (p = {self.p_worse:.2g} < {self.alpha:g}, at least {effect})"
        if self.verdict == "implausible":
            return (f"better by {-self.worse_by:.1%} (p = {self.p_better:.2g}): more than the policy finds "
                    "plausible; a measurement that broke, or a baseline to re-take on this host")
        if self.verdict == "improved":
            return f"better by {-self.worse_by:.1%} (p = {self.p_better:.2g})"
        if abs(self.worse_by) >= self.min_effect:
            return f"{self.worse_by:+.1%} but not significant (p = {self.p:.2g} >= {self.alpha:g})"
        return f"{self.worse_by:+.1%}, within the {effect} minimum effect (p = {self.p:.2g})"


def worsening(base: float, run: float, better: str) -> float:
    """How much worse ``run`` is than ``base``: lower-better run/base - 1, higher-better base/run - 1."""
    if better == "lower":
        return run / base - 1 if base else (math.inf if run > 0 else 0.0)
    return base / run - 1 if run else math.inf


def judge(base: Sequence[float], run: Sequence[float], better: str, *, min_effect: float,
          alpha: float = DEFAULT_ALPHA, max_improvement: float | None = None) -> Judgement:
    """Judge ``run``'s samples against ``base``'s (one figure): see the module's docstring.

    ``max_improvement``: a significant improvement larger than this fails as implausible (a figure three
    times better with the same code is a broken measurement or a stale baseline, not a release to wave on).
    """
    from scipy.stats import mannwhitneyu

    if better not in ("lower", "higher"):
        raise ValueError(f"better={better!r}: lower or higher")
    b_med, r_med = median(base), median(run)
    # Symmetric: three times slower is +200%, three times faster -200% (not -67%).
    worse_by = worsening(b_med, r_med, better)
    if worse_by < 0:
        worse_by = -worsening(r_med, b_med, better)
    n, m = len(base), len(run)
    if smallest_p(n, m) >= alpha:
        return Judgement("unjudgeable", b_med, r_med, worse_by, 1.0, 1.0, n, m, min_effect, alpha)
    if len(set(base) | set(run)) == 1:
        p_worse = p_better = 1.0  # every sample equal: nothing moved (the test is undefined on all ties)
    else:
        # "greater": the run's samples tend to be larger than the baseline's.
        larger_is_worse = "greater" if better == "lower" else "less"
        smaller = "less" if larger_is_worse == "greater" else "greater"
        p_worse = float(mannwhitneyu(run, base, alternative=larger_is_worse).pvalue)
        p_better = float(mannwhitneyu(run, base, alternative=smaller).pvalue)
    improvement = -worse_by
    if p_worse < alpha and worse_by >= min_effect:
        verdict = "regressed"
    elif p_better < alpha and improvement >= min_effect:
        implausible = max_improvement is not None and improvement > max_improvement
        verdict = "implausible" if implausible else "improved"
    else:
        verdict = "unchanged"
    return Judgement(verdict, b_med, r_med, worse_by, p_worse, p_better, n, m, min_effect, alpha)
