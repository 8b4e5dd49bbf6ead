"""A small Dockerfile reader, enough to check the images' policy without a Docker daemon.

It understands what our Dockerfiles use: comments and parser directives, line continuations,
``ARG`` defaults (global and per stage) with ``$VAR`` / ``${VAR}`` substitution in ``FROM``,
multi-stage builds (``FROM ... AS name``, ``COPY --from=name``), exec-form (JSON) and shell-form
instructions.  It is not a full BuildKit parser (no heredocs, no ``${VAR:-default}``).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from manifest_validation import image_is_pinned

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class Instruction:
    line: int  # 1-based line where the instruction starts
    cmd: str  # upper-case keyword
    args: str  # the rest, continuations joined

    def exec_form(self) -> Optional[list[str]]:
        """The JSON array of an exec-form instruction, or None for shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(x, str) for x in value) else None


@dataclass
class Stage:
    base: str  # FROM argument after ARG substitution
    name: Optional[str]
    instructions: list[Instruction] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)

    def last(self, cmd: str) -> Optional[Instruction]:
        found = [i for i in self.instructions if i.cmd == cmd]
        return found[-1] if found else None

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]


@dataclass
class Dockerfile:
    path: Optional[Path]
    instructions: list[Instruction]
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage_names(self) -> set[str]:
        return {s.name for s in self.stages if s.name}


def substitute(text: str, env: dict[str, str]) -> str:
    """Replace ``$VAR`` / ``${VAR}`` with known values; unknown variables are left as written."""
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), text)


def split_instructions(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not buf:
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue  # comments, parser directives, blank lines
            start = no
        elif line.strip().startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker too
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        joined = " ".join(part.strip() for part in buf).strip()
        buf = []
        keyword, _, rest = joined.partition(" ")
        out.append(Instruction(start, keyword.upper(), rest.strip()))
    if buf:
        raise ValueError(f"line {start}: continuation runs past the end of the file")
    return out


def _arg_default(args: str) -> tuple[str, Optional[str]]:
    name, eq, value = args.partition("=")
    if not eq:
        return name.strip(), None
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return name.strip(), value


def parse(text: str, path: Optional[Path] = None) -> Dockerfile:
    instructions = split_instructions(text)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.cmd == "ARG" and not stages:
            k, v = _arg_default(ins.args)
            if v is not None:
                global_args[k] = v
            continue
        if ins.cmd == "FROM":
            parts = shlex.split(ins.args)
            parts = [p for p in parts if not p.startswith("--platform")]
            base = substitute(parts[0], global_args)
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
            continue
        if not stages:
            raise ValueError(f"line {ins.line}: {ins.cmd} before the first FROM")
        stage = stages[-1]
        stage.instructions.append(ins)
        if ins.cmd == "ARG":
            k, v = _arg_default(ins.args)
            if v is not None:
                stage.args[k] = v
            elif k in global_args:
                stage.args[k] = global_args[k]
    if not stages:
        raise ValueError("no FROM instruction")
    return Dockerfile(path, instructions, global_args, stages)


def load(path: Path) -> Dockerfile:
    return parse(Path(path).read_text(), Path(path))


# ------------------------------------------------------------------------ policy checks

SECRET_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)


def user_of(stage: Stage) -> Optional[str]:
    ins = stage.last("USER")
    return substitute(ins.args.strip(), stage.args) if ins else None


def policy_problems(df: Dockerfile, console_scripts: dict[str, str]) -> list[str]:
    """Why this Dockerfile breaks the images' policy (empty list: it does not).

    * every base image is a previous stage or pinned by tag (not ``latest``) or digest;
    * the final stage runs as a numeric, non-zero UID;
    * the exec-form ENTRYPOINT names a console script the package defines;
    * no ENV/ARG with a secret-looking name carries a value; no ``pip install`` of a bare name.
    """
    probs: list[str] = []
    seen: set[str] = set()
    for st in df.stages:
        if st.base not in seen and st.base != "scratch":
            if "$" in st.base:
                probs.append(f"FROM {st.base}: unresolved variable (give the ARG a pinned default)")
            elif not image_is_pinned(st.base):
                probs.append(f"FROM {st.base}: base image not pinned by tag or digest")
        if st.name:
            seen.add(st.name)
    user = user_of(df.final)
    if user is None:
        probs.append("final stage has no USER (would run as root)")
    else:
        uid = user.split(":", 1)[0]
        if not uid.isdigit():
            probs.append(f"USER {user}: use a numeric UID so runAsNonRoot can verify it")
        elif int(uid) == 0:
            probs.append("USER 0 is root")
    ep = df.final.last("ENTRYPOINT")
    form = ep.exec_form() if ep else None
    if form is None or not form:
        probs.append("final stage needs an exec-form ENTRYPOINT")
    else:
        prog = Path(form[0]).name
        if prog not in console_scripts:
            probs.append(f"ENTRYPOINT {form[0]!r} is not a console script of the package ({sorted(console_scripts)})")
    for ins in df.instructions:
        if ins.cmd in ("ENV", "ARG"):
            for token in shlex.split(ins.args):
                key, eq, value = token.partition("=")
                if eq and value and SECRET_NAME.search(key):
                    probs.append(f"line {ins.line}: {ins.cmd} {key} bakes a secret-looking value into the image")
        if ins.cmd == "RUN" and "pip install" in ins.args:
            for cmd in re.split(r"&&|;", ins.args):
                if "pip install" not in cmd:
                    continue
                words = shlex.split(cmd.split("pip install", 1)[1])
                skip_next = False
                for w in words:
                    if skip_next:
                        skip_next = False
                        continue
                    if w in ("-r", "--requirement", "--index-url", "--extra-index-url", "--python", "-c", "--constraint"):
                        skip_next = True
                        continue
                    if w.startswith("-") or w.startswith("/") or w.startswith("."):
                        continue
                    if "==" not in w and "@" not in w:
                        probs.append(f"line {ins.line}: pip install {w!r} is not pinned")
    return probs
