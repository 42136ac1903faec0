"""Your own data (jsonl:, csv:, hf:) on fixture files written per test, with the tiny tokenizer."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_cfg

from splitcom.config import DataCfg, build_config
from splitcom.data import load_dataset, synthetic
from splitcom.data.tokenize import IGNORE, render, tokenize
from splitcom.errors import UserError
from splitcom.models.load import tiny_tokenizer

ROWS = [
    {"prompt": "Translate to French: cheese", "completion": "fromage", "topic": "food"},
    {"prompt": "Translate to French: bread", "completion": "pain", "topic": "food"},
    {"prompt": "Translate to French: bread", "completion": "du pain", "topic": "food"},
    {"prompt": "Translate to French: water", "completion": "eau", "topic": "drink"},
    {"prompt": "Translate to French: house", "completion": "maison", "topic": "home"},
]
CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris"}]},
    {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue"}]},
]
# A template in the shape of real ones: role headers, and the generation prompt opens the reply.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    t = tiny_tokenizer()  # a fresh object: the template must not leak into `tok`
    t.chat_template = TEMPLATE
    return t


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def data(**kw) -> DataCfg:
    return DataCfg.model_validate(kw)


def test_jsonl_prompt_completion(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:3]) + "\n\n" + json.dumps(ROWS[3]) + "\n",
                    encoding="utf-8")  # a blank line is skipped
    train, dev = load_dataset(f"jsonl:{path}", data=data(eval_file=str(write_jsonl(tmp_path / "e.jsonl",
                                                                                       ROWS[4:]))))
    assert [(e.prompt, e.completion) for e in train] == [(r["prompt"], r["completion"]) for r in ROWS[:4]]
    assert train[1].group == train[2].group == "Translate to French: bread"  # references group by prompt
    assert train[0].attrs == {"topic": "food"} and train[0].chat is None
    assert [e.completion for e in dev] == ["maison"]


def test_csv_with_renamed_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('question,answer,topic\n"Say, in French: cheese",fromage,food\n'
                    '"Two\nlines",deux lignes,misc\nbread,pain,food\n', encoding="utf-8")
    cfg = data(fields={"prompt": "question", "completion": "answer"}, eval_fraction=0.3)
    train, dev = load_dataset(f"csv:{path}", seed=3, data=cfg)
    got = sorted((e.prompt, e.completion, e.attrs["topic"]) for e in train + dev)
    assert got == [("Say, in French: cheese", "fromage", "food"), ("Two\nlines", "deux lignes", "misc"),
                   ("bread", "pain", "food")]
    assert len(dev) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text('question,answer\n"Two\nlines",ok\nthree\n', encoding="utf-8")
    with pytest.raises(UserError, match=f"^{bad}:4: no field 'answer'"):  # the row on file line 4
        load_dataset(f"csv:{bad}", data=cfg)


def test_messages_with_chat_template(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    train, dev = load_dataset(f"jsonl:{path}", data=data(fields={"messages": "messages"}, eval_fraction=0.3),
                              seed=0)
    by_completion = {e.completion: e for e in train + dev}
    ex = by_completion["Blue"]
    assert ex.chat == (("user", "Hi"), ("assistant", "Hello."), ("user", "Colour of the sky?"))
    assert ex.group == ex.prompt == "user: Hi\nassistant: Hello.\nuser: Colour of the sky?\nassistant:"
    prompt, completion = render(ex, chat_tok)
    assert prompt == ("<|user|>\nHi<|endoftext|>\n<|assistant|>\nHello.<|endoftext|>\n"
                      "<|user|>\nColour of the sky?<|endoftext|>\n<|assistant|>\n")  # verbatim: no "Input:"
    assert completion == "Blue"  # the generation prompt ends where the reply starts: no space
    [s] = tokenize([ex], chat_tok, 256)
    p = chat_tok(prompt, add_special_tokens=False)["input_ids"]
    c = chat_tok("Blue", add_special_tokens=False)["input_ids"] + [chat_tok.eos_token_id]
    assert s.ids == tuple(p + c) and s.labels == tuple([IGNORE] * len(p) + c)
    assert p.count(chat_tok.eos_token_id) == 3  # "<|endoftext|>" in the template is the special token


def test_messages_without_chat_template(tmp_path, tok):
    assert not tok.chat_template
    path = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    train, dev = load_dataset(f"jsonl:{path}", data=data(fields={"messages": "messages"}))
    ex = next(e for e in train + dev if e.completion == "Paris")
    assert render(ex, tok) == ("system: Be brief.\nuser: Capital of France?\nassistant:", " Paris")
    [s] = tokenize([ex], tok, 256)
    n_prompt = len(tok(ex.prompt, add_special_tokens=False)["input_ids"])
    assert s.labels[:n_prompt] == (IGNORE,) * n_prompt
    assert tok.decode(list(s.labels[n_prompt:])) == " Paris<|endoftext|>"


def test_messages_in_a_csv_cell(tmp_path):
    path = tmp_path / "chat.csv"
    cells = ['"' + json.dumps(c["messages"]).replace('"', '""') + '"' for c in CHATS]
    path.write_text("messages\n" + "\n".join(cells) + "\n", encoding="utf-8")
    train, dev = load_dataset(f"csv:{path}", data=data(fields={"messages": "messages"}))
    assert sorted(e.completion for e in train + dev) == ["4", "Blue", "Paris"]


def test_loss_on_the_completion_only(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    train, _ = load_dataset(f"jsonl:{path}", data=data(eval_fraction=0.2))
    samples = tokenize(train, tok, 128)
    for ex, s in zip(train, samples, strict=True):
        p = tok(f"Input: {ex.prompt}\nOutput:", add_special_tokens=False)["input_ids"]
        c = tok(" " + ex.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert s.ids == tuple(p + c)
        assert s.labels == tuple([IGNORE] * len(p) + c)


def test_builtin_datasets_tokenize_as_before(tok):
    """Examples without a chat: `Input: ...\\nOutput:` then a space and the completion, as always."""
    ex = synthetic.generate(3, seed=1)
    assert all(e.chat is None for e in ex)
    for e, s in zip(ex, tokenize(ex, tok, 512), strict=True):
        text = f"Input: {e.prompt}\nOutput: {e.completion}<|endoftext|>"
        assert tok.decode(list(s.ids)) == text


def test_hf_save_to_disk(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]),
                               "validation": datasets.Dataset.from_list(ROWS[4:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    train, dev = load_dataset(f"hf:{tmp_path / 'dd'}")
    assert (len(train), [e.completion for e in dev]) == (4, ["maison"])  # its own validation split
    train, dev = load_dataset(f"hf:{tmp_path / 'dd'}", data=data(eval_fraction=0.25))
    assert (len(train) + len(dev), len({e.group for e in dev})) == (4, 1)  # a fraction of train instead
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    train, dev = load_dataset(f"hf:{tmp_path / 'one'}")
    assert (len(train) + len(dev), len({e.group for e in dev})) == (5, 1)  # 10% of 4 prompts: 1
    datasets.Dataset.from_list([ROWS[0], {"prompt": "p", "completion": None}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(UserError, match=r"bad\['train'\]\[1\]: no field 'completion' \(the row has: prompt\)"):
        load_dataset(f"hf:{tmp_path / 'bad'}")


def test_hf_directory_of_data_files(tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"messages": c["messages"]} for c in CHATS[:2]])
    write_jsonl(d / "test.jsonl", [{"messages": CHATS[2]["messages"]}])
    train, dev = load_dataset(f"hf:{d}", data=data(fields={"messages": "messages"}))
    assert [e.completion for e in train] == ["Paris", "4"] and [e.completion for e in dev] == ["Blue"]


def test_eval_fraction_is_seeded_and_keeps_groups_together(tmp_path):
    rows = [{"prompt": f"p{i // 2}", "completion": f"c{i}"} for i in range(40)]  # 20 prompts, 2 refs each
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = data(eval_fraction=0.25)
    train, dev = load_dataset(f"jsonl:{path}", seed=5, data=cfg)
    assert (len(train), len(dev)) == (30, 10)
    assert not {e.group for e in train} & {e.group for e in dev}
    assert (train, dev) == load_dataset(f"jsonl:{path}", seed=5, data=cfg)
    splits = {tuple(e.group for e in load_dataset(f"jsonl:{path}", seed=s, data=cfg)[1]) for s in range(4)}
    assert len(splits) > 1  # the seed chooses the held-out prompts
    _, dev = load_dataset(f"jsonl:{path}", seed=5)  # no option: 10% of the prompts
    assert len({e.group for e in dev}) == 2


@pytest.mark.parametrize("text, line, needle", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "answer": "d"}\n', 2,
     "no field 'completion' \\(the row has: prompt, answer\\)"),
    ('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": " "}\n', 3, "empty completion"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"\n', 2, "not valid JSON"),
    ('[{"prompt": "a", "completion": "b"}]\n', 1, "not a JSON object.*one JSON object per line"),
    ('{"prompt": ["a"], "completion": "b"}\n', 1, "field 'prompt' is not text"),
])
def test_bad_jsonl_rows_name_file_and_line(tmp_path, text, line, needle):
    path = tmp_path / "data.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=f"^{path}:{line}: {needle}"):
        load_dataset(f"jsonl:{path}")


@pytest.mark.parametrize("chat, needle", [
    ([{"role": "user", "content": "a"}], "the last message of 'messages' is from 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "empty completion"),
    ([{"role": "user"}, {"role": "assistant", "content": "b"}], "message 0 of 'messages' needs"),
    ("hello", "field 'messages' is not a list .*not one in JSON"),
    ([], "field 'messages' is not a non-empty list"),
])
def test_bad_chats(tmp_path, chat, needle):
    path = write_jsonl(tmp_path / "c.jsonl", [CHATS[1], {"messages": chat}])
    with pytest.raises(UserError, match=f"^{path}:2: {needle}"):
        load_dataset(f"jsonl:{path}", data=data(fields={"messages": "messages"}))


def test_bad_specs_and_options(tmp_path):
    good = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cases = [
        (f"jsonl:{tmp_path / 'missing.jsonl'}", None, "missing.jsonl: file not found"),
        (f"hf:{tmp_path / 'nodir'}", None, "nodir: directory not found"),
        (f"hf:{tmp_path}", None, "`datasets` cannot load it"),  # holds d.jsonl, with other columns
        ("jsonl", None, "data.dataset: jsonl needs a file"),
        ("parquet:x.parquet", None, "unknown dataset 'parquet'"),
        (str(good), None, f"write jsonl:{good}"),
        (f"csv:{good}", None, "a .jsonl file given as csv:"),
        (f"jsonl:{good}", data(eval_file=str(tmp_path / "none.jsonl")), "none.jsonl: file not found "
                                                                          "\\(data.eval_file\\)"),
        ("synthetic", data(eval_fraction=0.2), "data.eval_fraction: applies to your own data only"),
    ]
    (tmp_path / "other.jsonl").write_text('{"x": [1]}\n{"x": {"a": 1}}\n', encoding="utf-8")
    for spec, cfg, needle in cases:
        with pytest.raises(UserError, match=needle):
            load_dataset(spec, data=cfg)
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "same", "completion": str(i)} for i in range(3)])
    with pytest.raises(UserError, match="data.eval_fraction: one distinct prompt only"):
        load_dataset(f"jsonl:{one}")
    with pytest.raises(UserError, match="data.eval_fraction: .*not both"):
        build_config({}, ["data.eval_file=x.jsonl", "data.eval_fraction=0.1"])


def test_prepare_runs_on_own_chat_data(tmp_path):
    from splitcom.federation.setup import prepare

    rows = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows[:8])
    eval_file = write_jsonl(tmp_path / "dev.jsonl", rows[8:])
    cfg = tiny_cfg(**{"data.dataset": f"jsonl:{train_file}", "data.eval_file": str(eval_file),
                      "data.fields.messages": "messages", "federation.num_clients": 2})
    s = prepare(cfg)
    assert (len(s.train), len(s.val), sorted(len(p) for p in s.partitions)) == (8, 2, [4, 4])
    for ex, sample in zip(s.val_examples, s.val, strict=True):
        completion = [t for t in sample.labels if t != IGNORE]
        assert s.tokenizer.decode(completion) == f" {ex.completion}<|endoftext|>"


def test_eval_reads_the_runs_fields_and_prompts_chats_as_in_training(tmp_path, chat_tok):
    """`splitcom eval` on own data: the run's field names and dev split, and chat prompts rendered by
    the template exactly as training rendered them."""
    from splitcom.evaluate.generate import eval_examples, group_inputs

    rows = [{"q": r["prompt"], "a": r["completion"]} for r in ROWS]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg = build_config({}, [f"data.dataset=jsonl:{path}", "data.fields.prompt=q", "data.fields.completion=a",
                            f"data.eval_file={write_jsonl(tmp_path / 'dev.jsonl', rows[:2])}"])
    dev = eval_examples(cfg.data.dataset, "dev", 10, 0, cfg.data)
    assert [e.completion for e in dev] == ["fromage", "pain"]
    chats = load_dataset(f"jsonl:{write_jsonl(tmp_path / 'c.jsonl', CHATS)}",
                         data=data(fields={"messages": "messages"}, eval_fraction=0.5))[0]
    for item, ex in zip(group_inputs(chats), chats, strict=False):
        assert item.prompt(chat_tok) == render(ex, chat_tok)[0] and item.prompt(chat_tok).endswith("<|assistant|>\n")
