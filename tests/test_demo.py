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
