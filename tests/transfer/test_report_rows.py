"""TransferReport.unmapped_rows: source slots with no target counterpart, grouped by role.field."""

from trace_transfer.transfer import TransferReport


def test_unmapped_slots_grouped_by_role_field():
    rep = TransferReport("llama", "gpt2", "reverse", [(0, 0)], source_unmapped=[
        {"role": "attn_q_norm", "slot": "attn_q_norm.weight L0", "core_params": 8},
        {"role": "attn_q_norm", "slot": "attn_q_norm.weight L1", "core_params": 4},
        {"role": "ffn_gate", "slot": "ffn_gate.weight L1", "core_params": 100},
    ])
    assert rep.unmapped_rows() == [{"role": "attn_q_norm.weight", "slots": 2, "core_params": 12},
                                   {"role": "ffn_gate.weight", "slots": 1, "core_params": 100}]
    assert rep.lost_core_params == 112
