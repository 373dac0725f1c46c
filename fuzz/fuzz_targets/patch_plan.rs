//! Patch planning against a random current rule set. The input is
//! `{"current": <rule set>, "patch": <patch>}`. Invariants:
//! - the committed rule set is the patch applied by a plain reference (set contents, rules,
//!   defaults, generation);
//! - the planned kernel change, replayed on a model of the table as the full render of the
//!   current rule set left it, gives a table equal to a full render of the patched rule set:
//!   the same sets with the same intervals, and per hook the same rule lines in the same
//!   order once jumps are followed (bucket chains may be numbered differently); every step
//!   of the change is one the kernel would accept (no duplicate interval, no deletion of a
//!   missing element, set or chain, no jump to a missing chain).
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use rampart::firewall::layout::Layout;
use rampart::firewall::render::{RenderCtx, render_full};
use rampart::firewall::spec::{Limits, Patch, RuleSet};
use rampart::firewall::{Firewall, KernelChange};
use rampart::sys::nfnl::Element;
use rampart::sys::nft::Nft;

type Interval = (u128, u128);

/// The parts of a table this check compares.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Table {
    sets: BTreeMap<String, BTreeSet<Interval>>,
    /// Chain name: (hook declaration, rule lines).
    chains: BTreeMap<String, (Option<String>, Vec<String>)>,
}

fn addr(s: &str) -> u128 {
    match s
        .parse::<IpAddr>()
        .unwrap_or_else(|e| panic!("address {s:?}: {e}"))
    {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// `{ a, b-c }` as intervals.
fn intervals(list: &str) -> Vec<Interval> {
    let inner = list.trim().trim_start_matches('{').trim_end_matches('}');
    inner
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| match t.split_once('-') {
            Some((a, b)) => (addr(a), addr(b)),
            None => (addr(t), addr(t)),
        })
        .collect()
}

/// The table a full render creates.
fn parse_full(text: &str, table: &str) -> Table {
    let mut t = Table::default();
    let head = format!("table inet {table} {{");
    let mut lines = text.lines().skip_while(|l| *l != head).skip(1);
    while let Some(l) = lines.next() {
        if let Some(name) = l.strip_prefix("\tset ").and_then(|r| r.strip_suffix(" {")) {
            let mut els = BTreeSet::new();
            for l in lines.by_ref() {
                if l == "\t}" {
                    break;
                }
                if let Some(list) = l.trim().strip_prefix("elements = ") {
                    els.extend(intervals(list));
                }
            }
            t.sets.insert(name.to_string(), els);
        } else if let Some(name) = l
            .strip_prefix("\tchain ")
            .and_then(|r| r.strip_suffix(" {"))
        {
            let mut decl = None;
            let mut body = vec![];
            for l in lines.by_ref() {
                if l == "\t}" {
                    break;
                }
                let l = l.trim();
                if l.starts_with("type filter hook") {
                    decl = Some(l.to_string());
                } else {
                    body.push(l.to_string());
                }
            }
            t.chains.insert(name.to_string(), (decl, body));
        }
    }
    t
}

fn add_intervals(t: &mut Table, set: &str, add: Vec<Interval>) {
    let have = t
        .sets
        .get_mut(set)
        .unwrap_or_else(|| panic!("elements added to missing set {set}"));
    for iv in add {
        assert!(
            !have.iter().any(|h| h.0 <= iv.1 && iv.0 <= h.1),
            "interval {iv:?} overlaps set {set}: {have:?}"
        );
        have.insert(iv);
    }
}

fn delete_intervals(t: &mut Table, set: &str, del: Vec<Interval>) {
    let have = t
        .sets
        .get_mut(set)
        .unwrap_or_else(|| panic!("elements deleted from missing set {set}"));
    for iv in del {
        assert!(have.remove(&iv), "deleted interval {iv:?} not in set {set}");
    }
}

/// One line of a patch's nft text, replayed on the model.
fn replay_line(t: &mut Table, line: &str, table: &str) {
    let word = |prefix: &str| -> Option<String> {
        line.strip_prefix(&format!("{prefix} inet {table} "))
            .map(str::to_string)
    };
    if let Some(rest) = word("add set") {
        let name = rest.split_whitespace().next().unwrap().to_string();
        assert!(
            t.sets.insert(name.clone(), BTreeSet::new()).is_none(),
            "set {name} exists"
        );
    } else if let Some(name) = word("delete set") {
        assert!(t.sets.remove(&name).is_some(), "deleted set {name} missing");
    } else if let Some(rest) = word("add element") {
        let (name, list) = rest.split_once(' ').unwrap();
        add_intervals(t, name, intervals(list));
    } else if let Some(rest) = word("delete element") {
        let (name, list) = rest.split_once(' ').unwrap();
        delete_intervals(t, name, intervals(list));
    } else if let Some(name) = word("flush chain") {
        t.chains
            .get_mut(&name)
            .unwrap_or_else(|| panic!("flushed chain {name} missing"))
            .1
            .clear();
    } else if let Some(name) = word("add chain") {
        let c = t.chains.entry(name.clone()).or_default();
        assert!(
            c.1.is_empty(),
            "add chain {name} would append to its old rules"
        );
    } else if let Some(name) = word("delete chain") {
        assert!(
            t.chains.remove(&name).is_some(),
            "deleted chain {name} missing"
        );
    } else if let Some(rest) = word("add rule") {
        let (name, rule) = rest.split_once(' ').unwrap();
        t.chains
            .get_mut(name)
            .unwrap_or_else(|| panic!("rule added to missing chain {name}"))
            .1
            .push(rule.to_string());
    } else {
        panic!("unexpected patch line {line:?}");
    }
}

/// Kernel elements (start, then end one past the last address unless at the top) as
/// intervals.
fn element_intervals(els: &[Element]) -> Vec<Interval> {
    let value = |k: &[u8]| k.iter().fold(0u128, |v, b| (v << 8) | u128::from(*b));
    let mut out = vec![];
    let mut i = 0;
    while i < els.len() {
        assert!(
            !els[i].end,
            "an interval starts with an end element: {els:?}"
        );
        let start = value(&els[i].key);
        let max = if els[i].key.len() == 4 {
            u32::MAX as u128
        } else {
            u128::MAX
        };
        match els.get(i + 1) {
            Some(e) if e.end => {
                out.push((start, value(&e.key) - 1));
                i += 2;
            }
            _ => {
                out.push((start, max));
                i += 1;
            }
        }
    }
    out
}

/// Per base chain, its rules with every jump replaced by the rules of its target.
fn flattened(t: &Table) -> BTreeMap<String, (Option<String>, Vec<String>)> {
    let mut out = BTreeMap::new();
    for (name, (decl, body)) in &t.chains {
        if decl.is_none() {
            continue;
        }
        let mut lines = vec![];
        for l in body {
            match l.strip_prefix("jump ") {
                Some(target) => {
                    let (_, inner) = t
                        .chains
                        .get(target)
                        .unwrap_or_else(|| panic!("jump to missing chain {target}"));
                    lines.extend(inner.iter().cloned());
                }
                None => lines.push(l.clone()),
            }
        }
        out.insert(name.clone(), (decl.clone(), lines));
    }
    out
}

/// The patch as a plain reading of the contract applies it.
fn reference(cur: &RuleSet, p: &Patch) -> RuleSet {
    let mut rs = cur.clone();
    for (name, els) in &p.set_address_sets {
        rs.sets.insert(name.clone(), els.clone());
    }
    for (name, els) in &p.add_addresses {
        rs.sets.get_mut(name).unwrap().extend(els.iter().cloned());
    }
    for (name, els) in &p.remove_addresses {
        rs.sets.get_mut(name).unwrap().retain(|e| !els.contains(e));
    }
    for name in &p.delete_address_sets {
        rs.sets.remove(name);
    }
    for id in &p.delete_rules {
        rs.rules.remove(id);
    }
    for r in &p.upsert_rules {
        rs.rules.insert(r.id.clone(), r.clone());
    }
    for (slot, new) in [
        (&mut rs.defaults.input, p.defaults.input),
        (&mut rs.defaults.output, p.defaults.output),
        (&mut rs.defaults.forward, p.defaults.forward),
    ] {
        if let Some(new) = new {
            *slot = new;
        }
    }
    rs.generation = p.generation;
    rs
}

fuzz_target!(|input: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(input) else {
        return;
    };
    let limits = Limits {
        max_rules: 400,
        max_elements: 4_000,
        max_rule_expansion: 64,
    };
    let Ok(current) = rampart::protocol::check_rule_set(&v["current"], &limits) else {
        return;
    };
    let Ok(bytes) = serde_json::to_vec(&v["patch"]) else {
        return;
    };
    let Ok(mut patch) = rampart::protocol::decode_stored_patch(&bytes) else {
        return;
    };
    // Always on top of the current generation: stale patches are not what this checks.
    patch.base_generation = current.generation;
    patch.generation = current.generation + 1;
    let ctx = RenderCtx {
        table: "rampart".into(),
        brokers: vec![("192.0.2.10".parse().unwrap(), 5671)],
        resolvers: vec![],
        failsafe_in: vec![],
        failsafe_out: vec![],
    };
    let mut fw = Firewall::new(
        Nft::new(std::path::Path::new("/nonexistent/nft")),
        ctx.clone(),
        limits,
        current.clone(),
    );
    let Ok(plan) = fw.plan_patch(&patch) else {
        return;
    };
    let before = render_full(&current, &Layout::build(current.rules.values()), &ctx);
    let mut model = parse_full(&before, "rampart");
    match &plan.kernel {
        KernelChange::Text(text) => {
            for line in text.lines() {
                replay_line(&mut model, line, "rampart");
            }
        }
        KernelChange::Elements(changes) => {
            for c in changes {
                delete_intervals(&mut model, &c.set, element_intervals(&c.delete));
                add_intervals(&mut model, &c.set, element_intervals(&c.add));
            }
        }
        KernelChange::Rules {
            sets,
            buckets,
            text,
        } => {
            // The edits by position must leave each chain as the text (which flushes and
            // refills it) does.
            let before = model.clone();
            for line in text.lines() {
                replay_line(&mut model, line, "rampart");
            }
            for b in buckets {
                let old = &before.chains[&b.chain].1;
                assert_eq!(
                    &rampart::firewall::edit::replay(old, b),
                    &model.chains[&b.chain].1,
                    "chain {} edited by position",
                    b.chain
                );
            }
            let mut by_elements = before;
            for c in &sets.create {
                // nft's all-zero opener of an interval set holds no address.
                let els: Vec<Element> = c
                    .elements
                    .iter()
                    .filter(|e| !(e.end && e.key.iter().all(|b| *b == 0)))
                    .cloned()
                    .collect();
                by_elements.sets.insert(c.name.clone(), BTreeSet::new());
                add_intervals(&mut by_elements, &c.name, element_intervals(&els));
            }
            for c in &sets.elements {
                delete_intervals(&mut by_elements, &c.set, element_intervals(&c.delete));
                add_intervals(&mut by_elements, &c.set, element_intervals(&c.add));
            }
            for name in &sets.delete {
                by_elements.sets.remove(name);
            }
            assert_eq!(by_elements.sets, model.sets, "set changes of a rule patch");
        }
    }
    fw.commit_patch(plan);
    let after = fw.current().clone();
    assert_eq!(after, reference(&current, &patch), "committed rule set");
    let full = parse_full(
        &render_full(&after, &Layout::build(after.rules.values()), &ctx),
        "rampart",
    );
    assert_eq!(model.sets, full.sets, "sets after the patch");
    assert_eq!(flattened(&model), flattened(&full), "rules after the patch");
    // No bucket chain is left behind without a jump to it.
    let jumped: BTreeSet<&str> = model
        .chains
        .values()
        .flat_map(|(_, body)| body.iter().filter_map(|l| l.strip_prefix("jump ")))
        .collect();
    for (name, (decl, _)) in &model.chains {
        assert!(
            decl.is_some() || jumped.contains(name.as_str()),
            "chain {name} left behind"
        );
    }
});
