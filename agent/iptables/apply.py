"""Applying the rules to the current network namespace, safely.

Per address family: read the state (`iptables-save`), decide (nothing there -> install; our chains there and equal
-> nothing to do; there but different -> replace with --reconcile/--force-apply, else refuse), then one
`iptables-restore --noflush` carrying the whole change.

Atomicity: iptables-restore commits each `*table ... COMMIT` block on its own (measured here with the nf_tables
backend: a failing nat block leaves an earlier mangle block applied), so one restore is atomic per table only.
Before writing we snapshot the tables we touch; if any step fails (a table the kernel refuses, `ip rule` failing)
every touched table of every family is restored from the snapshot with a flushing `iptables-restore`, and the
namespace is as it was.

Effects go through a `Runner`, so tests can record what would run (`RecordingRunner`) or run it for real.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from agent.errors import AgentError, ExitCode
from agent.iptables.config import CaptureConfig
from agent.iptables.rules import (
    BUILTIN_CHAINS,
    TABLE_ORDER,
    V4,
    V6,
    Rule,
    RuleSet,
    as_text,
    build_rules,
    chains_by_table,
    restore_text,
    table_blocks,
)

log = logging.getLogger("agent.iptables")

CAP_NET_ADMIN = 12


class IptablesError(AgentError):
    exit_code = ExitCode.IPTABLES_FAILED


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str = ""
    stderr: str = ""


# A policy-routing step: does its work if needed and returns the command that undoes it (None: nothing done).
_RouteStep = Callable[[], list[str] | None]


class Runner(Protocol):
    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result: ...

    def which(self, name: str) -> str | None: ...


class SubprocessRunner:
    """Runs the real binaries. A missing binary is a Result with code 127, never an exception."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        try:
            done = subprocess.run(
                list(argv), input=stdin, capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except FileNotFoundError:
            return Result(127, "", f"{argv[0]}: not found")
        except subprocess.TimeoutExpired:
            return Result(124, "", f"{argv[0]}: timed out after {self.timeout}s")
        return Result(done.returncode, done.stdout, done.stderr)

    def which(self, name: str) -> str | None:
        return shutil.which(name)


@dataclass
class RecordingRunner:
    """Records every call; answers from `responses` (first matching argv prefix) or with success."""

    available: frozenset[str] = frozenset()
    responses: list[tuple[tuple[str, ...], Result]] = field(default_factory=list)
    calls: list[tuple[tuple[str, ...], str | None]] = field(default_factory=list)

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        self.calls.append((tuple(argv), stdin))
        for prefix, result in self.responses:
            if tuple(argv[: len(prefix)]) == prefix:
                return result
        return Result(0)

    def which(self, name: str) -> str | None:
        return f"/usr/sbin/{name}" if name in self.available else None


def require_privileges() -> None:
    """CAP_NET_ADMIN in the effective set, what istio-init's securityContext grants. Being root is not enough: in a
    container that drops ALL capabilities, uid 0 cannot change the rules either (iptables then fails with "Permission
    denied (you must be root)")."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            effective = next((int(line.split()[1], 16) for line in status if line.startswith("CapEff:")), None)
    except OSError:
        effective = None
    if effective is None and os.geteuid() == 0:
        return  # no /proc to ask: root is the best guess
    if effective is not None and effective >> CAP_NET_ADMIN & 1:
        return
    raise AgentError(
        f"istio-iptables needs CAP_NET_ADMIN (root, or the NET_ADMIN capability); uid {os.geteuid()} runs without it",
        ExitCode.NOT_PERMITTED,
    )


@dataclass(frozen=True)
class Binaries:
    save: str
    restore: str
    iptables: str
    backend: str


def detect_binaries(runner: Runner, version: int) -> Binaries:
    """nft or legacy: the backend that already holds rules wins (kube-proxy or the CNI chose it for the node);
    with no rules anywhere, nft. Plain `iptables` (whatever it points to) when no variant is installed."""
    base = "iptables" if version == V4 else "ip6tables"
    variants = [
        v for v in ("nft", "legacy") if runner.which(f"{base}-{v}-restore") and runner.which(f"{base}-{v}-save")
    ]
    if len(variants) == 2:
        counts = {v: _rule_count(runner.run([f"{base}-{v}-save"]).stdout) for v in variants}
        variants = ["legacy"] if counts["legacy"] > 0 and counts["nft"] == 0 else ["nft"]
    if variants:
        v = variants[0]
        return Binaries(f"{base}-{v}-save", f"{base}-{v}-restore", f"{base}-{v}", v)
    if runner.which(f"{base}-restore") and runner.which(f"{base}-save"):
        return Binaries(f"{base}-save", f"{base}-restore", base, "default")
    raise IptablesError(f"{base}-restore and {base}-save not found in PATH: is iptables installed?")


def _rule_count(save_text: str) -> int:
    return sum(1 for line in save_text.splitlines() if line.startswith("-A "))


@dataclass
class TableState:
    chains: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)  # "-A CHAIN ..." lines as iptables-save prints them


def parse_save(text: str) -> dict[str, TableState]:
    tables: dict[str, TableState] = {}
    current: TableState | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), TableState())
        elif current is None or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            current.chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            current.rules.append(line)
    return tables


def split_tables(text: str) -> dict[str, str]:
    """iptables-save text -> {table: its block, ready for a flushing iptables-restore}."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = blocks.setdefault(line[1:].strip(), [line])
        elif current is not None and not line.startswith("#"):
            current.append(line)
    return {table: "\n".join(lines) + "\n" for table, lines in blocks.items()}


def _jump_target(words: Sequence[str]) -> str:
    return words[words.index("-j") + 1] if "-j" in words[:-1] else ""


@dataclass
class _Family:
    version: int
    bins: Binaries
    before: str
    state: dict[str, TableState]
    rules: tuple[Rule, ...]
    # Per table, the chains the rule set names: the only chains (and jumps into them) a run ever touches. Other
    # components' ISTIO_* chains (ambient, CNI, an operator's own) are not ours, whatever their name.
    ours: dict[str, frozenset[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.ours = {table: frozenset(chains) for table, chains in chains_by_table(self.rules).items()}

    @property
    def name(self) -> str:
        return "IPv4" if self.version == V4 else "IPv6"

    def chains_of(self, table: str) -> frozenset[str]:
        return self.ours.get(table, frozenset())

    def residue(self) -> bool:
        """Any of our chains present (a chain cannot be jumped to without existing)."""
        return any(c in self.chains_of(t) for t, state in self.state.items() for c in state.chains)


class Applier:
    """Plans and performs one run. `apply()` and `cleanup()` return a one-line summary or raise AgentError."""

    def __init__(self, cfg: CaptureConfig, runner: Runner, ruleset: RuleSet | None = None) -> None:
        self.cfg = cfg
        self.runner = runner
        # `ruleset` defaults to the config's; tests pass one with a rule the kernel refuses.
        self.ruleset = build_rules(cfg) if ruleset is None else ruleset

    # -- reading -------------------------------------------------------------------------------------------------

    def _family(self, version: int, required: bool, rules: tuple[Rule, ...] | None = None) -> _Family | None:
        try:
            bins = detect_binaries(self.runner, version)
        except IptablesError:
            if required:
                raise
            return None
        saved = self.runner.run([bins.save])
        if saved.returncode != 0:
            raise IptablesError(f"{bins.save} failed ({saved.returncode}): {_first_line(saved.stderr)}")
        rules = self.ruleset.family(version) if rules is None else rules
        return _Family(version, bins, saved.stdout, parse_save(saved.stdout), rules)

    def _families(self, include_unused_v6: bool) -> list[_Family]:
        families = [self._family(V4, required=True)]
        if self.cfg.enable_ipv6:
            families.append(self._family(V6, required=True))
        elif include_unused_v6:
            # Cleanup on a pod that is IPv4-only now: the IPv6 chains an IPv6 run of the same flags would name.
            dual = build_rules(dataclasses.replace(self.cfg, enable_ipv6=True))
            families.append(self._family(V6, required=False, rules=dual.v6))
        return [f for f in families if f is not None]

    def _matches(self, fam: _Family) -> bool:
        """Our chains hold exactly the wanted rules: every chain the rule set names exists; in each the same targets
        in the same order; as many jumps into them from built-in chains; and every rule present as written (-C,
        checked by iptables itself in one restore that commits nothing, so matches like `--dport` vs
        `-m tcp --dport` compare the way the kernel sees them). Other chains, whatever their name, do not count."""
        for table in TABLE_ORDER:
            state = fam.state.get(table, TableState())
            ours = fam.chains_of(table)
            if not ours <= set(state.chains):
                return False
            saved_targets: dict[str, list[str]] = {}
            for line in state.rules:
                words = line.split()
                target = _jump_target(words)
                if words[1] in ours or target in ours:
                    key = words[1] if words[1] in ours else f"{words[1]}->ISTIO"
                    saved_targets.setdefault(key, []).append(target)
            if saved_targets != _expected_targets([r for r in fam.rules if r.table == table], ours):
                return False
        check = _check_text(fam.rules)
        return self.runner.run([fam.bins.restore, "--noflush"], check).returncode == 0

    def _existing_builtin_rules(self, fam: _Family, rules: Sequence[Rule]) -> list[Rule]:
        """Our rules in built-in chains that are present now (iptables -C: the kernel's own comparison)."""
        present = []
        for rule in rules:
            if rule.chain in BUILTIN_CHAINS:
                argv = [fam.bins.iptables, "-t", rule.table, "-C", rule.chain, *rule.spec]
                if self.runner.run(argv).returncode == 0:
                    present.append(rule)
        return present

    def _removal_lines(self, fam: _Family) -> dict[str, list[str]]:
        """Per table: delete the built-in chains' jumps into our chains and our other rules there, then flush and
        delete our chains. Only the chains the rule set names: another component's ISTIO_* chain, and the jumps
        into it, stay (Istio's cleanup also touches only its rule set's chains)."""
        out: dict[str, list[str]] = {}
        for table, state in fam.state.items():
            for line in state.rules:
                words = line.split()
                if words[1] in BUILTIN_CHAINS and _jump_target(words) in fam.chains_of(table):
                    out.setdefault(table, []).append("-D" + line[2:])
        # Rules of ours that do not jump to one of our chains (RETURN for excluded NICs, TPROXY marks).
        plain = [r for r in fam.rules if r.chain in BUILTIN_CHAINS and r.spec[-1] not in fam.chains_of(r.table)]
        for rule in self._existing_builtin_rules(fam, plain):
            out.setdefault(rule.table, []).append(" ".join(("-D", rule.chain, *rule.spec)))
        for table, state in fam.state.items():
            present = [c for c in state.chains if c in fam.chains_of(table)]
            out.setdefault(table, []).extend(f"-F {c}" for c in present)
            out[table].extend(f"-X {c}" for c in present)
        return {t: lines for t, lines in out.items() if lines}

    # -- writing -------------------------------------------------------------------------------------------------

    def apply(self) -> str:
        families = self._families(include_unused_v6=False)
        scripts: list[tuple[_Family, str]] = []
        unchanged = []
        for fam in families:
            if fam.residue():
                same = self._matches(fam)
                if same and not self.cfg.force_apply:
                    unchanged.append(fam.name)
                    continue
                if not (self.cfg.reconcile or self.cfg.force_apply):
                    present = sorted({c for t, st in fam.state.items() for c in st.chains if c in fam.chains_of(t)})
                    raise IptablesError(
                        f"{fam.name}: {', '.join(present)} already exist and differ from the requested rules; left as "
                        "they are (rerun with --reconcile to replace them)"
                    )
                scripts.append((fam, restore_text(fam.rules, self._removal_lines(fam))))
            else:
                scripts.append((fam, restore_text(fam.rules)))
        routes = self._route_steps(install=True)
        self._transaction(scripts, routes)
        done = [f.name for f, _ in scripts]
        parts = []
        if done:
            parts.append(f"installed Istio capture rules ({', '.join(done)}, {families[0].bins.backend} backend)")
        if unchanged:
            parts.append(f"rules already in place, nothing changed ({', '.join(unchanged)})")
        return "; ".join(parts)

    def cleanup(self) -> str:
        families = self._families(include_unused_v6=True)
        scripts = []
        for fam in families:
            lines = self._removal_lines(fam)
            if lines:
                scripts.append((fam, restore_text((), lines)))
        routes = self._route_steps(install=False)
        self._transaction(scripts, routes)
        removed = ", ".join(f.name for f, _ in scripts) or "none found"
        return f"removed Istio capture rules ({removed})"

    def _transaction(self, scripts: Sequence[tuple[_Family, str]], routes: Sequence[_RouteStep]) -> None:
        applied: list[_Family] = []
        undo: list[list[str]] = []
        try:
            for fam, script in scripts:
                if not script:
                    continue
                applied.append(fam)
                done = self.runner.run([fam.bins.restore, "--noflush"], script)
                if done.returncode != 0:
                    raise IptablesError(
                        f"{fam.bins.restore} failed ({done.returncode}): {_restore_error(done.stderr)}; "
                        "rules restored to their previous state"
                    )
            for step in routes:
                reverse = step()
                if reverse:
                    undo.append(reverse)
        except AgentError:
            for argv in reversed(undo):
                if self.runner.run(argv).returncode != 0:
                    log.error("rollback: %s failed", " ".join(argv))
            self._rollback(applied, scripts)
            raise

    def _rollback(self, applied: Sequence[_Family], scripts: Sequence[tuple[_Family, str]]) -> None:
        script_of = {id(f): s for f, s in scripts}
        for fam in applied:
            touched = {line[1:].strip() for line in script_of[id(fam)].splitlines() if line.startswith("*")}
            blocks = split_tables(fam.before)
            text = "".join(blocks.get(t, f"*{t}\nCOMMIT\n") for t in TABLE_ORDER if t in touched)
            undo = self.runner.run([fam.bins.restore], text)
            if undo.returncode != 0:
                log.error("rollback of %s failed: %s", fam.name, _first_line(undo.stderr))

    # -- TPROXY policy routing ---------------------------------------------------------------------------------

    def _route_steps(self, install: bool) -> list[_RouteStep]:
        steps: list[_RouteStep] = []
        if install and self.cfg.enable_ipv6:
            # Envoy's IPv6 inbound passthrough binds ::6, which (unlike 127.0.0.6 in 127/8) is not local until
            # added to lo. Istio adds it and never removes it; so do we (cleanup leaves it, it is harmless).
            steps.append(self._ipv6_passthrough_address)
        if not (self.cfg.tproxy and self.cfg.inbound_ports_include):
            # Istio adds the policy routing only when inbound traffic is captured (tproxy.configureTProxyRoutes).
            return steps
        families = ["-4"] + (["-6"] if self.cfg.enable_ipv6 else [])
        mark, table = self.cfg.tproxy_mark, self.cfg.tproxy_route_table
        for fam in families:
            verb = "add" if install else "del"
            rule = ["rule", verb, "fwmark", mark, "lookup", table]
            route = ["route", verb, "local", "default", "dev", "lo", "table", table]
            steps.append(self._ip_step(fam, rule, install))
            steps.append(self._ip_step(fam, route, install))
        return steps

    def _ipv6_passthrough_address(self) -> list[str] | None:
        listed = self.runner.run(["ip", "-6", "addr", "show", "dev", "lo"])
        if " ::6/128 " in listed.stdout:
            return None
        done = self.runner.run(["ip", "-6", "addr", "add", "::6/128", "dev", "lo"])
        if done.returncode != 0 and "exists" not in done.stderr:
            raise IptablesError(f"ip -6 addr add ::6/128 dev lo failed: {_first_line(done.stderr)}")
        return ["ip", "-6", "addr", "del", "::6/128", "dev", "lo"]

    def _ip_step(self, fam: str, args: list[str], install: bool) -> _RouteStep:
        def step() -> list[str] | None:
            show = ["ip", fam, args[0], "show"] + (["table", args[-1]] if args[0] == "route" else [])
            listed = self.runner.run(show)
            if listed.returncode == 127:
                raise IptablesError("the ip command (iproute2) is needed for TPROXY mode and was not found")
            present = _route_present(listed.stdout, args)
            if present == install:
                return None
            done = self.runner.run(["ip", fam, *args])
            if done.returncode != 0:
                raise IptablesError(f"ip {fam} {' '.join(args)} failed: {_first_line(done.stderr)}")
            return ["ip", fam, args[0], "del" if install else "add", *args[2:]]

        return step


def _route_present(listing: str, args: list[str]) -> bool:
    if args[0] == "rule":
        mark = int(args[3])
        wanted = {f"fwmark {hex(mark)} lookup {args[5]}", f"fwmark {mark} lookup {args[5]}"}
        return any(w in line for line in listing.splitlines() for w in wanted)
    return any(line.startswith("local default dev lo") for line in listing.splitlines())


def _expected_targets(rules: Sequence[Rule], ours: frozenset[str]) -> dict[str, list[str]]:
    """Per chain of ours, the `-j` targets in the order the kernel will hold them (inserts at their position); per
    built-in chain, its jumps into our chains (`PREROUTING->ISTIO`)."""
    chains: dict[str, list[str]] = {}
    for rule in rules:
        target = _jump_target(rule.spec)
        if rule.chain in ours:
            key = rule.chain
        elif target in ours:
            key = f"{rule.chain}->ISTIO"
        else:
            continue
        order = chains.setdefault(key, [])
        if rule.is_insert:
            order.insert(int(rule.tokens[2]) - 1, target)
        else:
            order.append(target)
    return chains


def _check_text(rules: Sequence[Rule]) -> str:
    checks = {t: [" ".join(("-C", r.chain, *r.spec)) for r in rules if r.table == t] for t in TABLE_ORDER}
    return as_text(table_blocks(checks))


def cleanup_plan_lines(cfg: CaptureConfig) -> list[str]:
    """Dry-run of --cleanup-only: the commands Istio would try, in its order (rules undone in reverse, then chains)."""
    ruleset = build_rules(cfg)
    out: list[str] = []
    for version, binary in ((V4, "iptables"), (V6, "ip6tables")):
        rules = ruleset.family(version)
        for rule in reversed(rules):
            if rule.chain in BUILTIN_CHAINS:
                out.append(" ".join((binary, "-t", rule.table, "-D", rule.chain, *rule.spec)))
        for table, chains in chains_by_table(rules).items():
            for chain in chains:
                out.append(f"{binary} -t {table} -F {chain}")
                out.append(f"{binary} -t {table} -X {chain}")
    return out


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "(no error output)"


def _restore_error(stderr: str) -> str:
    # iptables-restore prints the reason and then "Error occurred at line: N" and a help hint; keep the useful part.
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith("Try `")]
    return " / ".join(lines[:3]) if lines else "(no error output)"
