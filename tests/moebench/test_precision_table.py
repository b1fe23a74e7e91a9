"""The closing table shows a low-precision policy's bytes per expert and the precision each miss used."""

from moebench.table import rows

MIB = 2**20


def test_precision_columns_appear_only_when_a_low_precision_policy_ran():
    full = {"model": "m", "policy": "lru", "budget": "25%", "passed": True, "precision": "full",
            "expert_bytes_by_precision": {"full": 336 * MIB}}
    headers, _ = rows([full])
    assert "MiB/expert" not in headers
    hobbit = {**full, "policy": "hobbit", "precision": "full+int4",
              "expert_bytes_by_precision": {"full": 336 * MIB, "int4": 97.125 * MIB},
              "misses_by_precision_per_round": {"full": 12.0, "int4": 30.5}}
    headers, table = rows([full, hobbit])
    cells = dict(zip(headers, table[1]))
    assert cells["MiB/expert"] == "full 336 / int4 97.1"
    assert cells["misses/round by precision"] == "full 12.0 / int4 30.5"
    assert dict(zip(headers, table[0]))["misses/round by precision"] == "-"
