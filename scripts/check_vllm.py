"""Serve an export with vLLM's CPU build and check it against our sampler (run by scripts/check_vllm.sh).

    python scripts/check_vllm.py --vllm-python VENV/bin/python [--merged DIR] [--base DIR --adapter DIR] --work DIR

1. The merged export, temperature 0: vLLM's answer to the README's request equals our sampler's greedy answer.
2. The same request with the exported grammar (structured outputs) and our logits processor (vllm_xargs): the
   answer is k distinct catalogue titles, none in the history, none of the excluded category.
3. The base model with the PEFT adapter (--enable-lora): 1 and 2 again on the adapter.
Without --merged, the merged export is the base model with the adapter folded in (written here); without
--adapter, a LoRA adapter with random (non-zero) weights stands in for a trained one, so that LoRA serving is
still checked for equality.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np

from reclm_jax.data.load import load_dataset
from reclm_jax.eval.parse import Catalogue
from reclm_jax.eval.recommend import IntentSpec, instruction
from reclm_jax.llm import hf_io, lora
from reclm_jax.llm.automaton import catalogue_automaton, save_automaton
from reclm_jax.llm.config import LoraConfig
from reclm_jax.llm.grammar import catalogue_grammar
from reclm_jax.llm.chat import ChatPolicy
from reclm_jax.llm.tokenizer import load_tokenizer
from reclm_jax.tasks.config import TaskConfig
from reclm_jax.tasks.templates import load_templates
from reclm_jax.tasks.encode import display_titles

ROOT = Path(__file__).resolve().parents[1]
HISTORY = ["Heat (1995)", "Toy Story (1995)", "Fargo (1996)"]
EXCLUDE = "Comedy"
K = 10
MAX_TOKENS = 256


def say(text: str) -> None:
    print(f"[check_vllm {time.strftime('%H:%M:%S')}] {text}", flush=True)


def random_adapter(base: Path, out: Path) -> Path:
    cfg, params = hf_io.load_pretrained(base)
    lora_cfg = LoraConfig(rank=8, alpha=16.0, dropout=0.0)
    adapter = lora.init(jax.random.key(0), params, cfg, lora_cfg)
    rng = np.random.default_rng(0)
    adapter = jax.tree_util.tree_map_with_path(
        lambda path, x: rng.normal(0, 0.02, x.shape).astype(np.float32) if path[-1].key == "b" else x, adapter)
    return hf_io.save_peft_dir(out, adapter, cfg, lora_cfg, base_model_name_or_path=str(base))


def our_answers(model_dir: Path, adapters: list[Path], prompt_ids: list[int], rows,
                policy: ChatPolicy) -> tuple[str, str]:
    """Our greedy answer, then our constrained greedy answer (`rows`), as `ChatPolicy` decodes them."""
    cfg, params = hf_io.load_merged(model_dir, adapters)
    return tuple(policy.answer(params, cfg, [prompt_ids], max_new_tokens=MAX_TOKENS, batch_size=1,
                               constraint=constraint)[0] for constraint in (None, rows))


class Server:
    def __init__(self, python: str, model: Path, work: Path, port: int, extra: list[str]):
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_USE_V2_MODEL_RUNNER": "0",
               "RECLM_AUTOMATON": str(work / "catalogue.npz"), "PYTHONPATH": str(ROOT)}
        self.log = open(work / f"vllm-{port}.log", "w")
        self.url = f"http://127.0.0.1:{port}"
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
             "reclm", "--port", str(port), "--max-model-len", "2048", "--dtype", "float32",
             "--logits-processors", "reclm_jax.llm.vllm_processor:CatalogueLogitsProcessor", *extra],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"vLLM exited with {self.proc.returncode}; see {self.log.name}")
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=5)
                break
            except OSError:
                time.sleep(5)
        self.startup = time.perf_counter() - start

    def chat(self, model: str, prompt: str, **extra) -> tuple[str, float]:
        body = {"model": model, "temperature": 0, "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": prompt}], **extra}
        req = urllib.request.Request(self.url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(req, timeout=1800) as r:
            answer = json.loads(r.read())["choices"][0]["message"]["content"]
        return answer, time.perf_counter() - start

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def check_valid(answer: str, catalogue: Catalogue, history: set[int], banned: np.ndarray) -> str | None:
    """Why `answer` is not k distinct catalogue titles outside the history and the excluded category."""
    items = [it.item_id for it in catalogue.parse(answer)]
    if len(items) != K:
        return f"{len(items)} items, not {K}"
    if -1 in items:
        return "a title not in the catalogue"
    if len(set(items)) != K:
        return "a repeated title"
    if set(items) & history:
        return "a history item"
    if banned[items].any():
        return f"an item of {EXCLUDE}"
    return None


def run(server: Server, model_name: str, label: str, prompt: str, greedy: str, constrained: str, grammar: str,
        xargs: dict, catalogue: Catalogue, history: set[int], banned: np.ndarray) -> bool:
    ok = True
    answer, seconds = server.chat(model_name, prompt)
    same = answer.strip() == greedy.strip()
    say(f"{label}, temperature 0, {seconds:.1f} s: {'EQUAL to' if same else 'DIFFERENT from'} our greedy answer")
    print(answer)
    if not same:
        print(f"--- ours:\n{greedy}")
        ok = False
    answer, seconds = server.chat(model_name, prompt, structured_outputs={"grammar": grammar}, vllm_xargs=xargs)
    problem = check_valid(answer, catalogue, history, banned)
    same = answer.strip() == constrained.strip()
    say(f"{label}, grammar + logits processor, {seconds:.1f} s: "
        + (f"INVALID ({problem})" if problem else f"{K} distinct catalogue titles, none in the history or {EXCLUDE}")
        + f"; {'equal to' if same else 'differs from'} our constrained greedy answer")
    print(answer)
    if not same:
        print(f"--- ours:\n{constrained}")
    return ok and problem is None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vllm-python", required=True)
    p.add_argument("--merged", type=Path, help="merged export (default: base + adapter, merged here)")
    p.add_argument("--base", type=Path, help="the base model in HF format (default: smollm2-135m, exported here)")
    p.add_argument("--adapter", type=Path, help="PEFT adapter of --base (default: random weights, written here)")
    p.add_argument("--work", type=Path, required=True)
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    base = args.base
    if base is None:
        base = work / "base"
        if not (base / "config.json").is_file():
            cfg, params = hf_io.load_pretrained("smollm2-135m")
            hf_io.save_hf_dir(base, params, cfg, tokenizer=load_tokenizer("smollm2-135m"), dtype="float32")
    adapter = args.adapter
    if adapter is None:
        adapter = work / "random-adapter"
        if not (adapter / "adapter_config.json").is_file():
            random_adapter(base, adapter)
        say(f"no --adapter: a LoRA adapter with random weights at {adapter} stands in for a trained one")
    merged = args.merged
    if merged is None:
        merged = work / "merged"
        if not (merged / "config.json").is_file():
            cfg, params = hf_io.load_merged(base, [adapter])
            hf_io.save_hf_dir(merged, params, cfg, tokenizer=load_tokenizer(base), dtype="float32")
    say(f"merged export: {merged}; base: {base}; adapter: {adapter}")

    policy = ChatPolicy.load(merged)
    dataset = load_dataset("ml-100k")
    templates = load_templates()
    titles = display_titles(dataset.titles, policy, TaskConfig.max_title_tokens)
    catalogue = Catalogue(titles)
    history = [catalogue.lookup(t)[0] for t in HISTORY]
    spec = IntentSpec.from_options(dataset.categories, templates, exclude=[EXCLUDE])
    prompt = instruction(templates, [titles[i] for i in history], K, spec.text(templates))
    (work / "grammar.ebnf").write_text(catalogue_grammar(titles, K))
    grammar = (work / "grammar.ebnf").read_text()
    start = time.perf_counter()
    automaton = catalogue_automaton(titles, policy.tokenizer)
    save_automaton(automaton, work / "catalogue.npz", 20, dataset.categories, dataset.category_matrix)
    say(f"automaton of {len(automaton.items)} titles built in {time.perf_counter() - start:.1f} s")
    rows = automaton.rows([K], [history], [spec.constraint()], dataset.category_matrix)
    xargs = {"reclm_k": K, "reclm_history": history, "reclm_exclude": list(spec.exclude)}
    prompt_ids = policy.prompt_ids([("user", prompt)], 2048 - MAX_TOKENS)
    banned = dataset.category_matrix[:, dataset.category_index[EXCLUDE]]
    say(f"prompt ({len(prompt_ids)} tokens):\n{prompt}")

    ok = True
    for label, served, adapters, extra, model_name in (
            ("merged export", merged, [], [], "reclm"),
            ("base + PEFT adapter (--enable-lora)", base, [adapter],
             ["--enable-lora", "--max-lora-rank", "16", "--lora-modules", f"reclm-lora={adapter}"], "reclm-lora")):
        start = time.perf_counter()
        greedy, constrained = our_answers(served, adapters, prompt_ids, rows, policy)
        say(f"{label}: our sampler's greedy and constrained answers in {time.perf_counter() - start:.0f} s")
        server = Server(args.vllm_python, served, work, 8011, extra)
        say(f"{label}: vLLM server up in {server.startup:.0f} s")
        try:
            ok &= run(server, model_name, label, prompt, greedy, constrained, grammar, xargs, catalogue,
                      set(history), banned)
        finally:
            server.stop()
    say("PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
