"""Transformers in one call: a converted MiniLM folder loaded with qtensors.torch.from_pretrained
for every preset, sentence embeddings against the fp32 model; tied weights of a masked-LM head."""

from __future__ import annotations

import os

import pytest
import torch

import qtensors as qt
import qtensors.torch as qtt

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new movie is awesome and the actors are great.",
    "The cat sits outside in the garden.",
    "I love pasta with fresh tomato sauce.",
    "Stock markets fell sharply on Monday after the announcement.",
    "How do I reset my password?",
    "The weather will be sunny and warm tomorrow.",
    "She reads a book in the quiet library.",
    "Quantum computers use qubits instead of bits.",
    "The train to Paris leaves at noon from platform nine.",
    "Regular exercise improves both physical and mental health.",
    "The committee postponed its decision until next year.",
]

# Floors on the mean cosine similarity to the fp32 embeddings, a little under what was measured
# (benches/results/minilm_cosine.txt: flexgen 0.968, int4-g64 0.962, int4-g128 0.939, nf4 0.969,
# int8 0.9997). Round-to-nearest 4-bit leaves this 6-layer, 384-wide model near 0.96, under the
# 0.99 hoped for; 8-bit is there.
FLOORS = {"flexgen": 0.955, "int4-g64": 0.95, "int4-g128": 0.925, "nf4": 0.955, "int8": 0.999}
FLOORS |= {"mxfp4": 0.945, "nvfp4": 0.96}


@pytest.fixture(scope="module")
def minilm(bert_path):
    src = os.path.dirname(bert_path)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    ref = transformers.AutoModel.from_pretrained(src).eval()
    return src, tok, qtt.sentence_embeddings(ref, tok, SENTENCES)


@pytest.mark.parametrize("preset", list(qt.PRESETS))
def test_minilm_presets(minilm, preset, tmp_path, exact_cpu_matmul):
    src, tok, ref = minilm
    dst = tmp_path / preset
    qt.convert(src, dst, quant=qt.PRESETS[preset])
    model = qtt.from_pretrained(dst, device="cpu")
    assert not model.training
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"QuantizedLinear", "QuantizedEmbedding"} <= kinds
    emb = qtt.sentence_embeddings(model, tok, SENTENCES)
    cos = (emb * ref).sum(1)
    print(f"\n{preset}: mean cosine {cos.mean():.5f}, min {cos.min():.5f}")
    assert cos.mean() >= FLOORS[preset]
    assert cos.min() >= FLOORS[preset] - 0.03
    # decoding at load gives the same embeddings as decoding on the fly
    decoded = qtt.from_pretrained(dst, device="cpu", keep_quantized=False)
    assert not any(type(m).__name__ == "QuantizedLinear" for m in decoded.modules())
    torch.testing.assert_close(qtt.sentence_embeddings(decoded, tok, SENTENCES), emb)


def test_tied_masked_lm_head(tmp_path, exact_cpu_matmul):
    cfg = transformers.BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    dst = tmp_path / "dst"
    qt.convert(src, dst, quant="int4-g64")
    q = qtt.from_pretrained(dst, model_cls=transformers.AutoModelForMaskedLM)
    head = q.get_output_embeddings().weight
    # still tied: one quantized weight shared by the embedding and the head, which multiplies
    # by its packed codes
    assert head is q.get_input_embeddings().weight
    assert isinstance(q.get_output_embeddings(), qtt.QuantizedLinear)
    assert isinstance(q.get_input_embeddings(), qtt.QuantizedEmbedding)
    ids = torch.tensor([[2, 17, 44, 3]])
    with torch.no_grad():
        got = q(input_ids=ids).logits
    # reference: the same file decoded by the Rust core into a normally built model
    ref = transformers.BertForMaskedLM(cfg).eval()
    files = qtt.model_files(dst)
    state = {}
    for f in files:
        state.update(qt.load_file(f, framework="pt"))
    ref.load_state_dict(state, strict=False)
    ref.tie_weights()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_from_pretrained_says_what_to_pass(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"folder .*nonexistent does not exist.*qtensors co"
    ):
        qtt.from_pretrained(tmp_path / "nonexistent")
    one = tmp_path / "m.qtensors"
    qt.save_file({"w": torch.ones(4, 4)}, one)
    with pytest.raises(ValueError, match=r"is a file: .*model folder.*load_model\(model, path\)"):
        qtt.from_pretrained(one)
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        qtt.from_pretrained(tmp_path)


def test_import_without_torch_says_how_to_install():
    import subprocess
    import sys

    code = "import sys; sys.modules['torch'] = None; import qtensors.torch"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 1
    assert "pip install 'qtensors[torch]'" in p.stderr.splitlines()[-1], p.stderr


def test_namespace_lists_the_api_only():
    import types

    extra = {
        n
        for n in dir(qtt)
        if not n.startswith("_")
        and n not in qtt.__all__
        and not isinstance(getattr(qtt, n), types.ModuleType)
    }
    assert not extra, extra
