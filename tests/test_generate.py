"""`vptq generate` / `vptq chat` (issue 9): original and quantized folders, registry artifacts,
piped chat, bad input. Tiny random Llama (SmolLM2's tokenizer), quantized in a few seconds."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner
from vptq_service.cli.main import app

from vptq.generate import chat_ids, generate_text
from vptq.io import load_quantized


def run(*args, input: str | None = None) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, [str(a) for a in args], input=input)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VPTQ_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VPTQ_ARTIFACTS", raising=False)
    return tmp_path / "home"


def test_generate_json_is_one_object(tiny_llama_dir):
    code, out, err = run("generate", tiny_llama_dir, "Hello there", "--max-new-tokens", "5", "--json")
    assert code == 0, err
    data = json.loads(out)  # the whole of stdout
    assert set(data) == {"text", "tokens", "seconds", "tokens_per_s"}
    assert data["tokens"] == 5 and data["seconds"] > 0 and data["tokens_per_s"] > 0


def test_generate_streams_the_greedy_text_of_a_quantized_folder(quantized_dir, smol_tokenizer):
    code, out, err = run("generate", quantized_dir, "Once upon a time", "--max-new-tokens", "8")
    assert code == 0, err
    model = load_quantized(quantized_dir)
    expected = generate_text(model, smol_tokenizer, "Once upon a time", 8)
    assert out == expected.text + "\n"
    assert "tokens/s" in err


def test_generate_from_the_registry_by_name(quantized_dir, home):
    from vptq_service.store.artifacts import open_artifact_store
    from vptq_service.store.registry import Registry

    Registry(open_artifact_store()).publish("tiny", "v1", quantized_dir)
    code, out, err = run("generate", "tiny", "Hi", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] == 3
    cached = home / "cache" / "artifacts" / "tiny" / "v1"
    assert (cached / "config.json").is_file()
    code, out2, err = run("generate", "tiny:v1", "Hi", "--max-new-tokens", "3", "--json")  # reuses the pull
    assert code == 0, err
    assert json.loads(out2)["text"] == json.loads(out)["text"]


def test_chat_piped_multi_turn(quantized_dir, smol_tokenizer, monkeypatch):
    import vptq.generate as g

    seen = []
    real = g.chat_ids
    monkeypatch.setattr(g, "chat_ids", lambda tok, msgs, limit=None: seen.append(list(msgs)) or real(tok, msgs, limit))
    code, out, err = run("chat", quantized_dir, "--max-new-tokens", "4", "--system", "Be brief.",
                         input="hello\n\nhow are you?\n/exit\nnever read\n")
    assert code == 0, err
    assert len(out.splitlines()) >= 2 and out.endswith("\n")
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert seen[1][1]["content"] == "hello" and seen[1][3]["content"] == "how are you?"
    assert len(seen) == 2  # /exit ended it
    # EOF ends it too
    code, out, err = run("chat", quantized_dir, "--max-new-tokens", "2", input="hi\n")
    assert code == 0, err


def test_chat_template_and_history_trimming(smol_tokenizer):
    msgs = [{"role": "system", "content": "S"}] + [
        {"role": r, "content": "word " * 40} for _ in range(5) for r in ("user", "assistant")] + [
        {"role": "user", "content": "last"}]
    full = chat_ids(smol_tokenizer, msgs)
    text = smol_tokenizer.decode(full[0])
    assert "<|im_start|>assistant" in text.rstrip()[-30:]  # generation prompt, SmolLM2's template
    trimmed = chat_ids(smol_tokenizer, msgs, max_tokens=120)
    assert trimmed.shape[1] <= 120 and "last" in smol_tokenizer.decode(trimmed[0])
    assert smol_tokenizer.decode(trimmed[0]).count("<|im_start|>system") == 1


@pytest.mark.parametrize("args, code, needle", [
    (["generate", "/no/such/model", "x"], 2, "does not exist"),
    (["generate", "no-such-artifact", "x"], 1, "no published artifact named 'no-such-artifact'"),
    (["generate", "smollm2", "x", "--max-new-tokens", "0"], 2, "--max-new-tokens 0"),
    (["chat", "bad name!"], 2, "does not exist"),
])
def test_bad_input_is_one_line(args, code, needle, home):
    got, out, err = run(*args)
    assert got == code, err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1 and out == ""


def test_inconsistent_quantized_folder_names_the_layer(quantized_dir, tmp_path, home):
    bad = shutil.copytree(quantized_dir, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["config_for_layers"]["model.layers.0.mlp.up_proj"]["num_centroids"] = [-1, 128]
    (bad / "config.json").write_text(json.dumps(cfg))
    code, out, err = run("generate", bad, "x")
    assert code == 2 and "layer model.layers.0.mlp.up_proj" in err and "Traceback" not in err


def test_a_gguf_tokenizer_carries_the_files_chat_template(quantized_dir):
    """An instruct model from a GGUF file (Qwen2.5-Instruct, SmolLM2-Instruct) chats with the file's own
    `tokenizer.chat_template` (transformers 5 reads it; vptq.generate's ChatML is only the fallback for a
    tokenizer without one), and a quantized folder saves it with its tokenizer."""
    from vptq.source import load_tokenizer, resolve

    want = load_tokenizer(resolve("smollm2")).chat_template
    # the file's own template (its default system prompt), not vptq.generate's ChatML fallback
    assert want and "You are a helpful AI assistant named SmolLM" in want
    assert load_tokenizer(resolve(str(quantized_dir))).chat_template == want  # saved beside the codes
