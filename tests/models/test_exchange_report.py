"""The joint method's exchanges are reported: per matrix (count and seconds), and as one line of the summary."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pyprune import PruneConfig, PruneReport, prune_model


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


def test_exchanges_in_the_report_and_summary():
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    rep = prune_model(_model(), ids, PruneConfig(sparsity="2:4", swaps=4), progress=False)
    made = [r.exchanges for r in rep.layers]
    assert sum(made) > 0 and all(0 <= x for x in made)
    # at most 4 per row of each 128-column block (64 columns here: one block)
    assert all(r.exchanges <= 4 * r.shape[0] * -(-r.shape[1] // 128) for r in rep.layers)
    # a matrix's seconds are its group's (q/k/v, gate/up) shared out evenly, so compare the sums
    assert all(r.exchange_seconds >= 0 for r in rep.layers)
    assert sum(r.exchange_seconds for r in rep.layers) <= sum(r.seconds for r in rep.layers) + 1e-6
    line = next(x for x in rep.table().splitlines() if x.startswith("exchanges "))
    assert f"{sum(made):,} made" in line and "at most 4" in line
    again = PruneReport.from_dict(rep.to_dict())
    assert [r.exchanges for r in again.layers] == made


def test_no_exchange_line_without_exchanges():
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    rep = prune_model(_model(), ids, PruneConfig(sparsity="2:4", swaps=0), progress=False)
    assert all(r.exchanges == 0 and r.exchange_seconds == 0 for r in rep.layers)
    assert not any(x.startswith("exchanges ") for x in rep.table().splitlines())
