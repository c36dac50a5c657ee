"""Generation for the evaluation CLI: the job list (every identity x prompt x seed of every method, each job
identified by what makes its image) and its run over one or several ComfyUI servers (one thread per server, a
shared queue: one ComfyUI per GPU, as ComfyUI users scale), resumable from runs.jsonl."""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

from . import eval_jobs as ej
from . import host
from .client import ComfyClient, ServerError

log = logging.getLogger("facecond.evaluate")


class Host:
    """The pack's headless ComfyUI in OUT/comfy_base; a server left by a killed run is stopped first."""

    def __init__(self, out: Path, base: Path, stand_ins: bool):
        self.pid_file = out / "comfyui.pid"
        self._stop_stale(base)
        host.import_comfy(base)
        host.load_pack(host.REPO, "facecond")
        host.prepare_base(base, host.REPO, "facecond")
        if stand_ins:
            host.install_stand_in_models(base)
        self.server = host.ComfyServer(base, pack_name="facecond")
        self.server.start()
        self.pid_file.write_text(f"{self.server.proc.pid} {base}\n")

    def _stop_stale(self, base: Path) -> None:
        try:
            pid, where = self.pid_file.read_text().split(maxsplit=1)
            cmd = Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            return
        if str(base) in cmd and where.strip() == str(base):
            log.info("stopping the ComfyUI (pid %s) a killed run left behind", pid)
            os.killpg(int(pid), signal.SIGKILL)

    def stop(self) -> None:
        self.server.stop()
        self.pid_file.unlink(missing_ok=True)


def apply_overrides(graph: dict, sets: dict[str, dict]) -> None:
    for node in graph.values():
        for key, value in sets.get(node["class_type"], {}).items():
            if key in node["inputs"] and not isinstance(node["inputs"][key], list):
                node["inputs"][key] = value


def build_jobs(methods, idents: dict, prompts: list[str], seeds: list[int], sets: dict, model_ids: ej.ModelIds,
               stand_in_base: Path | None) -> list[ej.Job]:
    """Every job with its final graph (photo inputs hold the photos' sha256) and its model files' identities."""
    photos = ej.photo_ids(idents)
    jobs = []
    for m in methods:
        for ident in idents:
            for pi, prompt in enumerate(prompts):
                text = prompt.replace("{}", m.subject)
                for seed in seeds:
                    graph = ej.fill_prompt(m, photos[ident], text, seed)
                    apply_overrides(graph, sets)
                    if stand_in_base is not None:
                        graph = host.use_stand_ins(graph, stand_in_base)
                    jobs.append(ej.Job(m.label, ident, pi, seed, text, graph, model_ids.of_graph(graph), prompt))
    return jobs


class _Worker(threading.Thread):
    """Takes jobs from the shared queue and runs them on one server until the queue is empty or a run stops."""

    def __init__(self, url: str, args, out: Path, idents: dict, by_label: dict, todo: queue.Queue,
                 ledger: ej.Ledger, stop: threading.Event, progress):
        super().__init__(daemon=True, name=f"eval@{url}")
        self.url, self.args, self.out, self.idents, self.by_label = url, args, out, idents, by_label
        self.todo, self.ledger, self.stop, self.progress = todo, ledger, stop, progress
        self.error: BaseException | None = None
        self.done = 0

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # handed to the main thread, which ends the run with it
            self.error = e
            self.stop.set()

    def _run(self) -> None:
        args, url = self.args, self.url
        client = ComfyClient(url, request_timeout=args.request_timeout, retries=args.retries)
        uploaded: dict[str, str] = {}
        photo_ids = ej.photo_ids(self.idents)
        while not self.stop.is_set():
            try:
                job = self.todo.get_nowait()
            except queue.Empty:
                return
            m = self.by_label[job.method]
            for k, (pid, path) in enumerate(zip(photo_ids[job.identity], self.idents[job.identity])):
                if pid not in uploaded:
                    uploaded[pid] = ej.upload_image(url, path, f"{job.identity}_{k}{path.suffix.lower()}",
                                                    timeout=args.request_timeout)
            start = time.monotonic()
            try:
                res = client.run(ej.with_uploads(job.graph, uploaded), timeout=args.timeout)
            except TimeoutError as e:
                raise ServerError(url, f"{job.label}: {e} (--timeout {args.timeout:.0f}); rerun with the same --out "
                                  "to resume, with a larger --timeout if the server is slow") from None
            if res.status != "success":
                raise RuntimeError(f"{job.label}: ComfyUI at {url} reported an error: {json.dumps(res.error)[:1500]}")
            images = [img for nid in m.outputs for img in res.outputs.get(nid, {}).get("images", [])]
            if not images:
                raise RuntimeError(f"{job.label}: no images from output node(s) {m.outputs}")
            files = []
            for k, img in enumerate(images):
                rel = f"{job.stem()}_{k:02d}.png"
                (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
                tmp = self.out / (rel + f".{threading.get_ident()}.part")
                tmp.write_bytes(ej.fetch_image(url, img, timeout=args.request_timeout))
                os.replace(tmp, self.out / rel)
                files.append(rel)
            total = time.monotonic() - start
            self.ledger.add({"job": job.key, "method": job.method, "identity": job.identity,
                             "prompt_index": job.prompt_index, "seed": job.seed, "prompt": job.prompt,
                             "prompt_template": job.template,
                             "files": files, "server": url, "prompt_id": res.prompt_id, "models": job.models,
                             "graph": job.graph, "seconds_total": total,
                             "seconds_sampling": ej.exec_seconds(res.messages), "finished": time.time()})
            self.done += 1
            self.progress(job, total, url)


def generate(args, out: Path, methods_specs, idents: dict, prompts: list[str], seeds: list[int],
             sets: dict, planned=None) -> list[ej.Job]:
    """Bind the methods, build the jobs (``planned(jobs)`` is told them before any runs), run those not in
    runs.jsonl over every server; returns all jobs."""
    server = None
    urls = list(dict.fromkeys(args.url or []))
    base = None
    if not urls:
        base = Path(args.base).resolve() if args.base else out / "comfy_base"
        server = Host(out, base, args.stand_ins)
        urls = [server.server.url]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on a plain kill too
    try:
        info = None
        for url in urls:  # every server answers and is ComfyUI before any job starts
            i = ComfyClient(url, request_timeout=args.request_timeout, retries=args.retries).object_info()
            info = info or i
        try:
            methods = [ej.bind_method(label, path, opts, info) for label, path, opts in methods_specs]
        except ValueError as e:  # a node the server lacks, a binding the workflow lacks
            from .client import WorkflowError

            raise WorkflowError(str(e)) from None
        roots = [Path(p) for p in (args.models_dir or [])] + ([base / "models"] if base is not None else [])
        jobs = build_jobs(methods, idents, prompts, seeds, sets, ej.ModelIds(out, roots),
                          base if args.stand_ins and base is not None else None)
        if planned is not None:
            planned(jobs)
        ledger = ej.Ledger(out)
        todo = [j for j in jobs if not ledger.done(j)]
        log.info("%d image job(s): %d done, %d to go on %d server(s)", len(jobs), len(jobs) - len(todo), len(todo),
                 len(urls))
        q: queue.Queue = queue.Queue()
        for j in todo:
            q.put(j)
        t0, count, lock = time.monotonic(), [0], threading.Lock()

        def progress(job, seconds, url):
            with lock:
                count[0] += 1
                n = count[0]
            eta = (time.monotonic() - t0) / n * (len(todo) - n)
            log.info("[%d/%d] %s on %s: %.2f s (about %.0f s to go)", n, len(todo), job.label, url, seconds, eta)

        stop = threading.Event()
        by_label = {m.label: m for m in methods}
        workers = [_Worker(u, args, out, idents, by_label, q, ledger, stop, progress) for u in urls]
        for w in workers:
            w.start()
        for w in workers:
            while w.is_alive():
                w.join(0.5)
        errors = [w.error for w in workers if w.error is not None]
        if errors:
            raise errors[0]
        return jobs
    finally:
        if server is not None:
            server.stop()
