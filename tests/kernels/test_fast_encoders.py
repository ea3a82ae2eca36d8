"""FastBert / FastWav2Vec2: transformers' BertModel and Wav2Vec2Model rebuilt from the kernels over packed,
padding-free sequences (fp32 here), against the transformers models run on one sequence at a time."""
import pytest
import torch
from transformers import BertConfig, BertModel, Wav2Vec2Config, Wav2Vec2Model

from qa_app.kernels.pooling import mean_pool, mean_pool_reference
from qa_app.models.fast_encoders import FastBert, FastWav2Vec2, pack_token_rows

CPU = torch.device("cpu")
BERT_LENS = (7, 19, 1, 33, 3)


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64)
    return BertModel(cfg, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def bert_rows():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, 100, (n,), generator=g).tolist(),
             "token_type_ids": [0] * (n // 2) + [1] * (n - n // 2)} for n in BERT_LENS]


def _bert_ref(bert, row, with_types):
    kwargs = {"token_type_ids": torch.tensor([row["token_type_ids"]])} if with_types else {}
    with torch.no_grad():
        return bert(input_ids=torch.tensor([row["input_ids"]]), **kwargs).last_hidden_state[0]


@pytest.mark.parametrize("with_types", [True, False])
def test_fast_bert_packed(close, bert, bert_rows, with_types):
    """Five sequences (lengths 1 to 33) packed back to back: each one's hidden states match BertModel run on
    that sequence alone, with token types (segment A then B) or without (type 0)."""
    rows = bert_rows if with_types else [{"input_ids": r["input_ids"]} for r in bert_rows]
    b = pack_token_rows(rows, CPU)
    h = FastBert(bert, torch.float32)(b["input_ids"], b["position_ids"], b["seq_start"], b["seq_len"],
                                      max(BERT_LENS), token_type_ids=b.get("token_type_ids"))
    assert h.shape == (sum(BERT_LENS), 32)
    for row, s in zip(bert_rows, b["seq_start"].tolist()):
        n = len(row["input_ids"])
        close(h[s:s + n], _bert_ref(bert, row, with_types))


def test_fast_bert_padded(close, bert, bert_rows):
    """Padded mode (what the padding-cost measurement runs): each row padded to 33 tokens, q_len 33, keys
    masked to the real length; the real rows match BertModel on the unpadded sequence."""
    padded = max(BERT_LENS)
    ids = torch.zeros(len(bert_rows), padded, dtype=torch.int64)
    types = torch.zeros_like(ids)
    for i, row in enumerate(bert_rows):
        n = len(row["input_ids"])
        ids[i, :n], types[i, :n] = torch.tensor(row["input_ids"]), torch.tensor(row["token_type_ids"])
    positions = torch.arange(padded).repeat(len(bert_rows))
    starts = torch.arange(len(bert_rows)) * padded
    lens = torch.tensor(BERT_LENS)
    h = FastBert(bert, torch.float32)(ids.flatten(), positions, starts, lens, padded, token_type_ids=types.flatten(),
                                      q_len=torch.full_like(lens, padded))
    for i, row in enumerate(bert_rows):
        n = len(row["input_ids"])
        close(h[i * padded:i * padded + n], _bert_ref(bert, row, True))


# The 10 bucket tokens past the real ones belong to no sequence: attention leaves their rows unwritten
# (torch.empty), so the later layers may overflow on that garbage. Only the real rows are compared.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_pack_token_rows_bucket(close, bert, bert_rows):
    """pack_token_rows padded to a fixed bucket (extra tokens and an extra, empty sequence): the layout is
    packed rows, positions restarting per row, zeros after; the real sequences' results are unchanged and
    the empty one pools to zeros."""
    b = pack_token_rows(bert_rows, CPU, tokens=70, sequences=6)
    total = sum(BERT_LENS)
    assert b["input_ids"].shape == (70,) and b["seq_start"].tolist() == [0, 7, 26, 27, 60, 0]
    assert b["seq_len"].tolist() == list(BERT_LENS) + [0]
    assert b["position_ids"][:total].tolist() == [p for n in BERT_LENS for p in range(n)]
    assert b["input_ids"][:total].tolist() == [t for r in bert_rows for t in r["input_ids"]]
    assert not b["input_ids"][total:].any() and not b["position_ids"][total:].any()
    assert b["token_type_ids"][:total].tolist() == [t for r in bert_rows for t in r["token_type_ids"]]

    h = FastBert(bert, torch.float32)(b["input_ids"], b["position_ids"], b["seq_start"], b["seq_len"], 64,
                                      token_type_ids=b["token_type_ids"])
    for row, s in zip(bert_rows, b["seq_start"].tolist()):
        close(h[s:s + len(row["input_ids"])], _bert_ref(bert, row, True))
    pooled = mean_pool(h, b["seq_start"], b["seq_len"])
    assert torch.equal(pooled[5], torch.zeros(32))
    close(pooled, mean_pool_reference(h, b["seq_start"], b["seq_len"]))


def test_fast_bert_rejects_relative_positions():
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     position_embedding_type="relative_key")
    with pytest.raises(ValueError, match="absolute"):
        FastBert(BertModel(cfg, add_pooling_layer=False), torch.float32)


@pytest.mark.parametrize("norm,stable", [("group", False), ("layer", True)])
def test_fast_wav2vec2(close, norm, stable):
    """The whole model on three packed utterances (1600, 2500 and 400 samples: 4, 7 and 1 frames): GroupNorm
    feature encoder with post-norm transformer, or LayerNorm encoder with pre-norm (stable) transformer;
    each utterance's frames match Wav2Vec2Model run on it alone."""
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                         conv_bias=norm == "layer", feat_extract_norm=norm, do_stable_layer_norm=stable,
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    model = Wav2Vec2Model(cfg).eval()
    lens = [1600, 2500, 400]
    waves = [torch.randn(n) for n in lens]
    h, packed = FastWav2Vec2(model, torch.float32)(torch.cat(waves), lens)
    assert packed.lengths == [4, 7, 1] and h.shape == (12, 32)
    for wave, s, n in zip(waves, packed.starts, packed.lengths):
        with torch.no_grad():
            ref = model(wave[None]).last_hidden_state[0]
        close(h[s:s + n], ref)


def test_fast_wav2vec2_bucket_plan_matches_exact():
    """A CUDA graph replays the forward with buffers and grids sized for its bucket (more utterances, a longer
    longest) and this batch's lengths only on the device: the utterances' frames must be the same bits as
    with a plan sized exactly for them."""
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                         feat_extract_norm="group", num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    fast = FastWav2Vec2(Wav2Vec2Model(cfg).eval(), torch.float32)
    lens = [1600, 2500, 300]  # the last: no frame at all
    samples = torch.randn(sum(lens))
    exact = fast.plan(lens)
    bucket = fast.plan(lens, utterances=4, longest=4000)
    assert bucket.meta.shape == (8, 4, 4) and bucket.frame_rows == 4 * 12 > exact.frame_rows == 11
    padded = torch.cat([samples, torch.randn(4 * 4000 - len(samples))])  # scratch past the utterances
    want = fast.forward(samples, torch.from_numpy(exact.meta), exact)
    got = fast.forward(padded, torch.from_numpy(bucket.meta), bucket)
    assert torch.equal(got[:exact.frame_rows], want)
