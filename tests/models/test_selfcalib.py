"""Self-generated calibration (pyprune.selfcalib) on tiny random models: the seed fixes the samples, samples do not
depend on how many are asked for, the start and the vocabulary rules hold, and bad arguments are refused."""
import pytest
import torch

from pyprune.selfcalib import self_generated_samples

from .tiny import VOCAB, tiny_model


class Tok:
    """The token ids a tokenizer exposes; special tokens as given."""

    def __init__(self, bos=None, eos=None):
        self.bos_token_id, self.eos_token_id = bos, eos

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


@pytest.fixture(scope="module", params=["llama", "mamba"])
def model(request):
    return tiny_model(request.param, torch.Generator().manual_seed(7))


def test_seeded_and_reproducible(model):
    tok = Tok(bos=1, eos=2)
    a = self_generated_samples(model, tok, 3, 12, seed=5, batch_size=3)
    b = self_generated_samples(model, tok, 3, 12, seed=5, batch_size=3)
    assert a.dtype == torch.long and a.shape == (3, 12)
    assert torch.equal(a, b)
    assert bool((a[:, 0] == 1).all())                        # the BOS token starts every sample
    assert bool((a[:, 1:] != 2).all())                       # the end of sequence is never drawn
    assert bool(((a >= 0) & (a < VOCAB)).all())
    c = self_generated_samples(model, tok, 3, 12, seed=6, batch_size=3)
    assert not torch.equal(a[:, 1:], c[:, 1:])
    assert len({tuple(r) for r in a[:, 1:].tolist()}) == 3  # each sample its own stream
    one = self_generated_samples(model, tok, 1, 12, seed=5, batch_size=1)
    assert torch.equal(one[0], a[0])                         # sample 0 whatever the count and batch


def test_top_k_one_is_greedy(model):
    tok = Tok(bos=3, eos=None)
    ids = self_generated_samples(model, tok, 2, 8, seed=0, top_k=1, batch_size=2)
    assert torch.equal(ids[0], ids[1])                       # no randomness left
    with torch.no_grad():                                    # each token the argmax after its prefix
        logits = model(ids[:1]).logits[0]
    assert torch.equal(logits[:-1].argmax(-1), ids[0, 1:])


def test_start_text_and_errors(model):
    ids = self_generated_samples(model, Tok(), 2, 6, seed=1, start="ab", batch_size=2)
    assert ids[:, :2].tolist() == [[97, 98], [97, 98]]
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        self_generated_samples(model, Tok(), 1, 6)
    with pytest.raises(ValueError, match="not fewer than seqlen"):
        self_generated_samples(model, Tok(bos=1), 1, 2, start=[1, 2, 3])
    for kw in (dict(nsamples=0), dict(seqlen=-1), dict(top_k=0), dict(temperature=0.0), dict(batch_size=True)):
        args = dict(nsamples=1, seqlen=4) | kw
        with pytest.raises(ValueError, match="self-generated calibration"):
            self_generated_samples(model, Tok(bos=1), args.pop("nsamples"), args.pop("seqlen"), **args)
