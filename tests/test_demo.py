"""The in-memory demo (`make demo` until the agent runs on real interfaces)."""

import re

from mpvpn import cli
from mpvpn.tools import demo


def test_demo_reports_carrier_loss_and_delivered_loss(capsys):
    assert demo.main(["--packets", "4000", "--loss", "20", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    carriers = re.findall(r"^(telecom|unicom|mobile)\s.*?([\d.]+)%$", out, re.M)
    assert [c[0] for c in carriers] == ["telecom", "unicom", "mobile"]
    assert all(12 < float(c[1]) < 28 for c in carriers)
    delivered = float(re.search(r"^delivered\s+([\d.]+)%", out, re.M).group(1))
    assert delivered < 3.0  # 0.8 % expected; far below each carrier's 20 %
    assert "in order: yes" in out
    m = re.search(r"failover: .*?: (\d+)/(\d+) delivered", out)
    assert m and m.group(1) == m.group(2)  # nothing lost when a carrier fails
    assert "carrier back: subflow state on A: established" in out


def test_cli_runs_the_demo_and_rejects_nonsense(capsys):
    import pytest

    assert cli.main(["demo", "--packets", "1000"]) == 0
    for main in (demo.main, lambda argv: cli.main(["demo", *argv])):
        with pytest.raises(SystemExit) as e:  # loss > 100 %
            main(["--loss", "150"])
        assert e.value.code == 2


# --- the expected range printed next to the measured loss --------------------------------

def test_lost_range_is_the_binomial_interval():
    """One group: the same bounds as the suite's own exact binomial tails (tests/stats.py)."""
    from stats import binomial_interval

    for n, p in ((20000, 0.008), (1500, 0.008), (300, 0.125), (50, 0.5), (10, 0.0), (10, 1.0), (0, 0.3)):
        for coverage in (0.99, 0.999999):
            assert demo.lost_range([(n, p)], coverage) == binomial_interval(n, p, 1 - coverage), (n, p)


def test_lost_range_of_packets_with_fewer_carriers():
    """Packets sent while a carrier was out of use are lost with p^2, not p^3: the range is
    that of the sum, checked against the full convolution of the two pmfs."""
    import math

    def pmf(n, p):
        return [math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)]

    a, b = pmf(120, 0.008), pmf(40, 0.04)
    full = [sum(a[i] * b[k - i] for i in range(len(a)) if 0 <= k - i < len(b)) for k in range(len(a) + len(b) - 1)]
    lo, hi = demo.lost_range([(120, 0.008), (40, 0.04)], 0.99)
    assert sum(full[:lo]) <= 0.005 < sum(full[:lo + 1])
    assert sum(full[hi + 1:]) <= 0.005 < sum(full[hi:])
    assert demo.lost_range([(20000, 0.008), (1371, 0.04)], 0.99) > demo.lost_range([(21371, 0.008)], 0.99)


def test_explain_loss_says_inside_or_outside():
    lines = demo.explain_loss(20000, 160, 0.2, {3: 20000}, 3, [])
    lo, hi = demo.lost_range([(20000, 0.008)], 0.99)
    assert lines == [f"expected  0.80 % (p^3); with 20000 packets 99 % of runs measure "
                     f"{100 * lo / 20000:.2f} % to {100 * hi / 20000:.2f} %",
                     "          measured 0.80 %: inside that range"]
    assert demo.explain_loss(20000, hi + 1, 0.2, {3: 20000}, 3, [])[-1].endswith("ABOVE that range")
    assert demo.explain_loss(20000, lo - 1, 0.2, {3: 20000}, 3, [])[-1].endswith("below that range")
    # a carrier out of use for part of the run: the range for what was sent
    lines = demo.explain_loss(20000, hi + 20, 0.2, {3: 18629, 2: 1371}, 3, ["'mobile' out of use 0.69 s"])
    lo2, hi2 = demo.lost_range([(1371, 0.04), (18629, 0.008)], 0.99)
    assert lines[1] == "          'mobile' out of use 0.69 s: 1371 packets had 2 carriers,"
    assert lines[2] == f"          so this run expects {100 * lo2 / 20000:.2f} % to {100 * hi2 / 20000:.2f} %"
    assert lines[3].endswith(": inside that range") == (lo2 <= hi + 20 <= hi2)


def test_demo_prints_the_range_and_its_verdict(capsys):
    """The run's printed range is that of the packets it sent with how many carriers were up,
    and its verdict agrees with the numbers; the loss lies within bounds of 1e-6 (from
    the sample size) of the same groups."""
    assert demo.main(["--packets", "3000", "--loss", "20", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    lost = round(float(re.search(r"^delivered\s+([\d.]+)%", out, re.M).group(1)) * 30)
    m = re.search(r"^expected  0\.80 % \(p\^3\); with 3000 packets 99 % of runs measure "
                  r"([\d.]+) % to ([\d.]+) %$", out, re.M)
    assert m, out
    lo, hi = demo.lost_range([(3000, 0.008)], 0.99)
    assert (m.group(1), m.group(2)) == (f"{lo / 30:.2f}", f"{hi / 30:.2f}")
    groups = [(3000, 0.008)]
    fewer = re.findall(r"(\d+) packets had (\d) carriers?", out)
    if fewer:
        n_fewer = sum(int(n) for n, _ in fewer)
        groups = [(3000 - n_fewer, 0.008)] + [(int(n), 0.2 ** int(k)) for n, k in fewer]
        r = re.search(r"so this run expects ([\d.]+) % to ([\d.]+) %", out)
        lo, hi = demo.lost_range(groups, 0.99)
        assert (r.group(1), r.group(2)) == (f"{lo / 30:.2f}", f"{hi / 30:.2f}")
    verdict = re.search(r"measured ([\d.]+) %: (inside|below|ABOVE) that range", out)
    assert verdict.group(2) == ("inside" if lo <= lost <= hi else "below" if lost < lo else "ABOVE")
    wide = demo.lost_range(groups, 1 - 1e-6)
    assert wide[0] <= lost <= wide[1]
