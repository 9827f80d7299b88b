"""The README's first command: the demo finds every planted near-duplicate."""
from fastinfluence import demo


def test_demo_recovers_planted_near_duplicates(capsys):
    summary = demo.run(seed=0)
    out = capsys.readouterr().out
    assert summary["ok"], out
    assert summary["found"] == [True] * demo.N_FACTS
    assert "planted copies ranked first for 4/4 queries: OK" in out


def test_demo_data_plants_near_duplicates():
    import random

    data = demo.make_data(20, 3, random.Random(1))
    assert len(data.train) == 20 + 3 * demo.N_FACTS
    for g, fact in enumerate(data.facts):
        copies = [t for t, grp in zip(data.train, data.train_group) if grp == g]
        assert len(copies) == 3
        for c in copies + [data.queries[g]]:  # one word changed at most
            assert len(c) == len(fact) and sum(a != b for a, b in zip(c, fact)) <= 1
