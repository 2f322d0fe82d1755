import json

import pytest
import torch

from dpq.data import Collator, LengthBucketSampler, load_data, read_file
from dpq.errors import DpqError


def write(folder, name, text, mode="w"):
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def test_real_slice_loads(sst2_slice):
    data = load_data(sst2_slice)
    assert len(data.split("train")) == 200 and len(data.split("dev")) == 100
    assert data.label_names == ["0", "1"]
    assert set(data.split("train").labels) == {0, 1}


def test_sst2_quotes_are_kept_literally(tmp_path):
    write(tmp_path, "train.tsv", 'sentence\tlabel\nhe said " wow\t1\nbad "film\t0\n')
    write(tmp_path, "dev.tsv", "sentence\tlabel\nok\t1\n")
    data = load_data(tmp_path)
    assert data.split("train").texts == ['he said " wow', 'bad "film']


def test_csv_and_jsonl_pair_with_string_labels(tmp_path):
    tr = write(tmp_path, "tr.csv", 'text,label\n"a, quoted",pos\nplain,neg\n')
    dv = tmp_path / "dv.jsonl"
    dv.write_text(json.dumps({"sentence": "x", "label": "pos"}) + "\n")
    data = load_data(f"{tr},{dv}")
    assert data.label_names == ["neg", "pos"]
    assert data.split("train").texts == ["a, quoted", "plain"]
    assert data.split("train").labels == [1, 0]
    assert data.split("dev").labels == [1]


@pytest.mark.parametrize("files, message", [
    ({"train.tsv": "sentence\tlabel\na\t1\n"}, "no dev split"),
    ({"train.tsv": "text\tlab\na\t1\n", "dev.tsv": "sentence\tlabel\na\t1\n"}, "no 'label' column"),
    ({"train.tsv": "sentence\tlabel\n", "dev.tsv": "sentence\tlabel\na\t1\n"}, "split is empty"),
    ({"train.tsv": "sentence\tlabel\na\t1\nb\t0\n", "dev.tsv": "sentence\tlabel\na\t7\n"}, "label '7'"),
    ({"train.tsv": "sentence\tlabel\na\t1\nb\t1\n", "dev.tsv": "sentence\tlabel\na\t1\n"}, "only one class"),
    ({"train.tsv": "sentence\tlabel\na\t1\nb\t0\tx\nc\t0\n", "dev.tsv": "sentence\tlabel\na\t1\n"}, "line 3"),
])
def test_validation_errors_are_one_line(tmp_path, files, message):
    for name, text in files.items():
        write(tmp_path, name, text)
    with pytest.raises(DpqError) as e:
        load_data(tmp_path)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_non_utf8_names_the_line(tmp_path):
    write(tmp_path, "train.tsv", b"sentence\tlabel\nfine\t1\ncaf\xe9\t0\n")
    write(tmp_path, "dev.tsv", "sentence\tlabel\na\t1\n")
    with pytest.raises(DpqError, match=r"train.tsv:3: not UTF-8"):
        load_data(tmp_path)


def test_missing_file_and_path(tmp_path):
    with pytest.raises(DpqError, match="file not found"):
        read_file(tmp_path / "nope.tsv")
    with pytest.raises(DpqError, match="no such file or folder"):
        load_data(str(tmp_path / "missing" / "dir"))


def test_skip_bad_rows_counts(tmp_path):
    rows = "".join(f"s{i}\t{i % 2}\n" for i in range(50))
    write(tmp_path, "train.tsv", "sentence\tlabel\n" + rows + "broken line without tab\n\t\n" + "x\t\n")
    write(tmp_path, "dev.tsv", "sentence\tlabel\na\t1\n")
    with pytest.raises(DpqError, match="2 malformed row"):
        load_data(tmp_path)
    data = load_data(tmp_path, skip_bad_rows=True)
    assert len(data.split("train")) == 50 and data.skipped_rows == 2


def test_subset_is_seeded(sst2_slice):
    train = load_data(sst2_slice).split("train")
    a, b, c = train.subset(50, 1), train.subset(50, 1), train.subset(50, 2)
    assert a.texts == b.texts and a.texts != c.texts and len(a) == 50


def test_bucket_sampler_covers_every_example_once_and_is_deterministic():
    lengths = [((i * 37) % 23) + 1 for i in range(103)]
    s = LengthBucketSampler(lengths, 8, shuffle=True, seed=3, pool=4)
    s.seek(0)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert batches == list(s)
    s.seek(1)
    assert list(s) != batches
    s.seek(0, start_batch=5)
    assert list(s) == batches[5:] and len(s) == len(batches) - 5
    # bucketing: padding within batches is far below random batching
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert waste < 0.5 * sum(lengths)


def test_collator_pads_and_masks():
    batch = Collator({"input_ids": 0})([{"input_ids": [5, 6, 7], "labels": 1, "index": 0},
                                        {"input_ids": [5], "labels": 0, "index": 1}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert torch.equal(batch["labels"], torch.tensor([1, 0]))


def test_validation_names_the_dev_split(sst2_slice):
    data = load_data(sst2_slice, need=("validation",))
    assert data.split("validation") is data.split("dev") and len(data.split("val")) == 100
    with pytest.raises(DpqError, match="no 'test' split"):
        load_data(sst2_slice, need=("test",))


def test_hub_id_offline_is_one_line_error():
    with pytest.raises(DpqError, match="Hugging Face Hub"):
        load_data("some-org/no-such-dataset-xyz:cfg")


def test_hub_errors_a_user_causes_are_one_line_and_bugs_are_not(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def failing(exc):
        def load_dataset(*args, **kwargs):
            raise exc
        return load_dataset

    for exc in [DatasetNotFoundError("no such dataset"), ConnectionError("offline"),
                ValueError("BuilderConfig 'x' not found")]:
        monkeypatch.setattr(datasets, "load_dataset", failing(exc))
        with pytest.raises(DpqError, match=f"Hugging Face Hub .*{str(exc)[:8]}"):
            load_data("org/name:x")
    monkeypatch.setattr(datasets, "load_dataset", failing(TypeError("a bug, in dpq or below it")))
    with pytest.raises(TypeError):  # not reported as the user's mistake
        load_data("org/name:x")


def test_hold_out_is_seeded_disjoint_and_capped(sst2_slice):
    data = load_data(sst2_slice)
    a, b = data.hold_out(0.1, 1000, seed=0, unit="row"), data.hold_out(0.1, 1000, seed=0, unit="row")
    assert len(a.split("heldout")) == 20 and len(a.split("train")) == 180
    assert a.split("heldout").texts == b.split("heldout").texts  # deterministic by seed
    assert data.hold_out(0.1, 1000, seed=1, unit="row").split("heldout").texts != a.split("heldout").texts
    # every training row lands in exactly one of the two (rows are compared with their position, duplicates too)
    assert sorted(a.split("train").texts + a.split("heldout").texts) == sorted(data.split("train").texts)
    assert a.split("dev").texts == data.split("dev").texts and a.selection_split == "heldout"
    assert len(data.hold_out(0.4, 7, seed=0, unit="row").split("heldout")) == 7
    none = data.hold_out(0.0, 1000, seed=0)
    assert none is data and none.selection_split == "dev"


def _phrase_tree_data(tmp_path):
    """SST-2's shape: every sentence comes with phrases of it (word spans), some phrases shared between sentences."""
    sentences = [f"the film number {i} is a {'fine' if i % 2 else 'dull'} piece of work" for i in range(40)]
    rows = []
    for i, s in enumerate(sentences):
        w = s.split()
        rows += [s, " ".join(w[3:]), " ".join(w[2:4])] + (["piece of work"] if i % 10 == 0 else [])
    label = lambda t: int("fine" in t)
    write(tmp_path, "train.tsv", "sentence\tlabel\n" + "".join(f"{t} \t{label(t)}\n" for t in rows))
    write(tmp_path, "dev.tsv", "sentence\tlabel\na fine film\t1\na dull film\t0\n")
    return load_data(tmp_path), sentences


def test_sentence_hold_out_keeps_every_phrase_of_a_held_out_sentence_out_of_train(tmp_path):
    data, sentences = _phrase_tree_data(tmp_path)
    a = data.hold_out(0.2, 1000, seed=0)  # the default unit: sentence
    held = [" ".join(t.split()) for t in a.split("heldout").texts]
    train = {" ".join(t.split()) for t in a.split("train").texts}
    assert held and set(held) <= set(sentences)  # whole sentences only, never a phrase
    spans = {" ".join(h.split()[x:y]) for h in held for x in range(11) for y in range(x + 1, 12)}
    assert not train & spans  # no phrase of a held-out sentence trains, shared ones ("piece of work") included
    assert len(data.split("train")) - len(a.split("train")) >= int(0.2 * len(data.split("train")))  # budget reached
    assert a.split("heldout").texts == data.hold_out(0.2, 1000, seed=0).split("heldout").texts
    assert a.split("heldout").texts != data.hold_out(0.2, 1000, seed=1).split("heldout").texts
    assert len(data.hold_out(0.4, 3, seed=0).split("heldout")) == 3  # max_samples counts sentences
    rows = data.hold_out(0.2, 1000, seed=0, unit="row")
    assert len(rows.split("train")) + len(rows.split("heldout")) == len(data.split("train"))


def test_sentence_hold_out_falls_back_to_rows_for_long_form_text(tmp_path, monkeypatch):
    from dpq import data as data_module

    data, _ = _phrase_tree_data(tmp_path)
    monkeypatch.setattr(data_module, "SPAN_BUDGET", 10)  # as if every row were a long review
    a = data.hold_out(0.1, 1000, seed=0)
    assert len(a.split("heldout")) == int(0.1 * len(data.split("train")))
    assert len(a.split("train")) + len(a.split("heldout")) == len(data.split("train"))
