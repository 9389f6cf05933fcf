"""The FDB hash table against a dict, under random learn/lookup/age/flush sequences."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st
from numba import njit

from switch.fdb import Fdb, fdb_age, fdb_learn, fdb_lookup


@njit(cache=True)
def _learn(t, k, v, now):
    return fdb_learn(t, k, v, now)


@njit(cache=True)
def _lookup(t, k, now):
    return fdb_lookup(t, k, now)


REFRESH = min(100_000_000, 300_000_000 >> 6)

ops = st.lists(st.tuples(st.sampled_from(["learn", "lookup", "age", "flush", "tick"]),
                         st.integers(1, 60), st.integers(1, 5)), max_size=300)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_fdb_matches_a_dict(seq):
    age = 300_000_000
    f = Fdb(capacity=64, age_s=age / 1e9)   # tiny table: collisions, wrap-around, full
    model: dict[int, tuple[int, int]] = {}
    now = 1000
    for op, key, val in seq:
        if op == "tick":
            now += key * 7_000_000
        elif op == "learn":
            r = _learn(f.table, key, val, now)
            if r == -1:
                assert len(model) * 4 >= 64 * 3 and key not in model
            else:
                assert r == (1 if key not in model else 2 if model[key][0] != val else 0)
                # the table refreshes a known entry's time at most every 100 ms
                ts = now if key not in model or now - model[key][1] > REFRESH else model[key][1]
                model[key] = (val, ts)
        elif op == "lookup":
            v, purged = _lookup(f.table, key, now)
            if key in model and now - model[key][1] <= age:
                assert (v, purged) == (model[key][0], 0)
            else:
                assert v == -1
                assert purged == (1 if key in model else 0)
                model.pop(key, None)
        elif op == "age":
            n = fdb_age(f.table, now)
            stale = [k for k, (_, ts) in model.items() if now - ts > age]
            assert n == len(stale)
            for k in stale:
                del model[k]
        elif op == "flush":
            n = f.flush_port(val)
            gone = [k for k, (v, _) in model.items() if v == val]
            assert n == len(gone)
            for k in gone:
                del model[k]
        assert int(f.info[0]) == len(model)
    # every surviving key is still reachable (probe chains intact after deletions)
    for k, (v, ts) in model.items():
        if now - ts <= age:
            assert _lookup(f.table, k, now)[0] == v
