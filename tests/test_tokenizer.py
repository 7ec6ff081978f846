import json

import numpy as np
from transformers import AutoTokenizer

from train.data.dataset import prompt_text, read_prepared, tokenize
from train.data.prepare import PrepareOptions, prepare
from train.data.tokenizer import load_tokenizer


def test_round_trip_and_special_tokens(tokenizer_dir, synthetic_raw):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    assert tok.is_fast and len(tok) == 400
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    rec = json.loads(next((synthetic_raw / "test").rglob("*.jsonl")).read_text().splitlines()[0])
    for text in [rec["question"], rec["generated_answer"][0], "unseen: ü ∑ 12345 \\boxed{7}\n\ttab"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    digits = tok.convert_ids_to_tokens(tok("12345", add_special_tokens=False)["input_ids"])
    assert all(len(t.strip("▁")) <= 1 for t in digits)  # digits split, so numbers are digit by digit


def test_tokenize_prepared_data(tokenizer_dir, synthetic_raw, tmp_path):
    out = tmp_path / "p"
    prepare(PrepareOptions(inputs=[str(synthetic_raw / "train")], output=str(out), grader="hendrycks", workers=1,
                           show_progress=False))
    table = read_prepared(out, labels=("pos",))
    assert set(table.column("label").to_pylist()) == {"pos"}
    tok = load_tokenizer(tokenizer_dir)
    full = tokenize(table, tok, max_len=4096)
    cut = int(np.median(full.lengths))
    data = tokenize(table, tok, max_len=cut)
    assert len(data) + data.dropped == table.num_rows and len(data) > 0 and data.lengths.max() <= cut
    assert data.dropped == int((full.prompt_lens >= cut).sum())  # only samples with no room for a target
    assert full.cut == 0 and data.cut == int(((full.lengths > cut) & (full.prompt_lens < cut)).sum()) > 0
    assert f"{data.cut} (" in data.describe(cut) and f"{data.dropped} left out" in data.describe(cut)
    q, r = table.column("question")[0].as_py(), table.column("rationale")[0].as_py()
    first = full.input_ids[0]
    assert first[0] == tok.bos_token_id and first[-1] == tok.eos_token_id
    assert tok.decode(first[1:full.prompt_lens[0]]) == prompt_text(q)
    assert tok.decode(first[full.prompt_lens[0]:-1]) == r
