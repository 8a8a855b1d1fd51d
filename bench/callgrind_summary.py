#!/usr/bin/python3
"""Per-operation instruction counts from a callgrind profile (bench/profile.sh uses it).

  callgrind_summary.py FILE --per 'C_Sign$' [--calls 'label=regex'] 'label=regex' ...

Reads callgrind's output format (fn=/cfn=/calls= lines, name compression), computes each
function's inclusive cost (Ir) and how often it was called, and prints, for every label, the
inclusive Ir of the functions whose demangled name matches its regex (summed over the matches
that do not call one another), divided by the number of calls to the --per function: the
instructions one operation spends there. Instruction counts do not depend on the machine's load,
unlike time. Recursion is not untangled: use it for the call tree's top levels.
"""
import argparse
import collections
import re
import sys


def parse(path):
    """Returns (total Ir, {fn: self Ir}, {fn: {callee: inclusive Ir}}, {fn: calls received})."""
    names = {"fn": {}, "cfn": {}}
    total = 0
    self_cost = collections.Counter()
    callees = collections.defaultdict(collections.Counter)
    calls = collections.Counter()
    fn = None
    pending_call = None  # (callee, count): the next cost line is that call's inclusive cost
    events = None

    def name(kind, text):
        match = re.match(r"\((\d+)\)(?: (.*))?$", text)
        if not match:
            return text
        ident, value = match.groups()
        table = names["fn"]  # fn and cfn share one id space
        if value is not None:
            table[ident] = value
        return table.get(ident, text)

    with open(path, errors="replace") as lines:
        for line in lines:
            line = line.rstrip("\n")
            if not line:
                continue
            head = line[0]
            if head.isdigit() or head in "+-*":
                if fn is None:
                    continue
                parts = line.split()
                cost = int(parts[1]) if len(parts) > 1 else 0
                if pending_call is not None:
                    callee, count = pending_call
                    callees[fn][callee] += cost
                    calls[callee] += count
                    pending_call = None
                else:
                    self_cost[fn] += cost
                continue
            if line.startswith(("events:", "totals:", "summary:")):
                key, _, value = line.partition(":")
                if key == "events":
                    events = value.split()
                elif key == "totals" or (key == "summary" and not total):
                    total = int(value.split()[0])
                continue
            key, _, value = line.partition("=")
            if key == "fn":
                fn = name("fn", value)
            elif key == "cfn":
                cfn = name("cfn", value)
            elif key == "calls":
                pending_call = (cfn, int(value.split()[0]))
    if events and events[0] != "Ir":
        sys.exit(f"{path}: first event is {events[0]}, not Ir")
    return total, self_cost, callees, calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--per", required=True, help="regex of the function counted as one op")
    parser.add_argument("--title", default="")
    parser.add_argument("--calls", action="append", default=[],
                        help="label=regex: also print how often matching functions are called "
                             "per operation (e.g. malloc: allocations per operation)")
    parser.add_argument("items", nargs="+", metavar="FILE label=regex",
                        help="the callgrind file, then the stages to report")
    args = parser.parse_intermixed_args()
    args.profile, args.labels = args.items[0], args.items[1:]

    total, self_cost, callees, calls = parse(args.profile)
    functions = set(self_cost) | set(callees) | set(calls)
    inclusive = {f: self_cost[f] + sum(callees[f].values()) for f in functions}
    per = re.compile(args.per)
    ops = sum(count for f, count in calls.items() if per.search(f))
    if ops == 0:
        sys.exit(f"no call to a function matching {args.per!r} in {args.profile}")

    def matching(regex):
        pattern = re.compile(regex)
        found = {f for f in functions if pattern.search(f)}
        # Keep only the outermost matches: a match called by another match is inside its cost.
        inner = {c for f in found for c in callees[f] if c in found and c != f}
        return found - inner

    width = max(len(label.split("=", 1)[0]) for label in args.labels)
    if args.title:
        print(args.title)
    print(f"{ops} operations ({args.per}); {total / ops:,.0f} Ir per operation in all")
    print(f"{'':{width}}  {'Ir/op':>10}  {'share':>6}")
    for item in args.labels:
        label, _, regex = item.partition("=")
        cost = sum(inclusive[f] for f in matching(regex))
        print(f"{label:{width}}  {cost / ops:>10,.0f}  {100 * cost / total:>5.1f}%")
    for item in args.calls:
        label, _, regex = item.partition("=")
        pattern = re.compile(regex)
        count = sum(n for f, n in calls.items() if pattern.search(f))
        print(f"{label}: {count / ops:.1f} calls per operation")


if __name__ == "__main__":
    main()
