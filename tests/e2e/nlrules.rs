//! Rule patches over netlink (issue 14) checked against nft itself: the same patch applied
//! through the agent's own bytecode and through `nft -f` must leave the same table, for
//! every rule shape the renderer makes, and the rules a patch keeps keep their counters.

use anyhow::{Context, Result, bail, ensure};
use rampart::firewall::render::RenderCtx;
use rampart::firewall::spec::{Limits, Patch, RuleSet};
use rampart::firewall::{ApplyPlan, Firewall, KernelChange, edit};
use rampart::protocol::{decode_stored_patch, decode_stored_rule_set};
use rampart::sys::nft::Nft;
use serde_json::{Value, json};

use crate::support::netns::{Netns, in_ns};
use crate::trial;
use libtest_mimic::Trial;

pub fn tests() -> Vec<Trial> {
    vec![
        trial(
            "nlrules::every_rule_shape_lists_the_same_after_a_netlink_patch_as_after_nft",
            every_shape,
        ),
        trial(
            "nlrules::a_chain_changed_behind_our_back_falls_back_to_text",
            changed_behind_our_back,
        ),
        trial(
            "nlrules::a_whole_table_over_netlink_lists_the_same_as_through_nft",
            whole_table,
        ),
    ]
}

fn rule(id: &str, prio: u32, extra: Value) -> Value {
    let mut r = json!({"id": id, "priority": prio, "action": "allow", "direction": "in"});
    for (k, v) in extra.as_object().expect("an object") {
        r[k] = v.clone();
    }
    r
}

/// A rule of every shape the renderer makes: protocols, one port, a range, port sets with
/// and without ranges (and one running to 65535), host and prefix literals of both
/// families (whole-byte, masked, /0), literal sets with overlaps and neighbours, named
/// sets, interfaces (names, wildcards, all), logging, and reject in every family context.
fn shapes(prefix: &str, prio: u32) -> Vec<Value> {
    let p = |s: &str| format!("{prefix}{s}");
    vec![
        rule(
            &p("tcp1"),
            prio,
            json!({"protocol": "tcp", "ports": ["22"]}),
        ),
        rule(
            &p("tcprange"),
            prio,
            json!({"protocol": "tcp", "ports": ["1000-2000"], "action": "reject"}),
        ),
        rule(
            &p("udpset"),
            prio,
            json!({"protocol": "udp", "ports": ["53", "123", "53", "5353"], "action": "drop"}),
        ),
        rule(
            &p("tcpiv"),
            prio,
            json!({"protocol": "tcp", "ports": ["22", "8000-8080", "8081", "60000-65535"]}),
        ),
        rule(
            &p("tcpany"),
            prio,
            json!({"protocol": "tcp", "direction": "both"}),
        ),
        rule(
            &p("udpany"),
            prio,
            json!({"protocol": "udp", "action": "reject", "direction": "out"}),
        ),
        rule(
            &p("icmp"),
            prio,
            json!({"protocol": "icmp", "action": "reject"}),
        ),
        rule(
            &p("icmp6"),
            prio,
            json!({"protocol": "icmpv6", "sources": ["2001:db8::/48"]}),
        ),
        rule(&p("anyrej"), prio, json!({"action": "reject", "log": true})),
        rule(
            &p("v4host"),
            prio,
            json!({"sources": ["192.0.2.7"], "action": "reject"}),
        ),
        rule(
            &p("v4mask"),
            prio,
            json!({"sources": ["10.0.0.0/20"], "destinations": ["10.9.0.0/16"], "protocol": "tcp", "ports": ["443"], "action": "reject"}),
        ),
        rule(
            &p("v4zero"),
            prio,
            json!({"sources": ["0.0.0.0/0"], "protocol": "udp", "ports": ["9"]}),
        ),
        rule(
            &p("v6mask"),
            prio,
            json!({"sources": ["2001:db8:8000::/33", "2001:db8::1"], "action": "reject"}),
        ),
        rule(
            &p("v6zero"),
            prio,
            json!({"destinations": ["::/0"], "action": "drop", "direction": "out"}),
        ),
        rule(
            &p("litset"),
            prio,
            json!({"sources": ["10.0.0.0/24", "10.0.1.0/24", "10.0.3.1", "10.0.0.5", "2001:db8::/64", "2001:db8::1"]}),
        ),
        rule(
            &p("hostset"),
            prio,
            json!({"destinations": ["192.0.2.1", "192.0.2.9", "255.255.255.255"], "direction": "out"}),
        ),
        rule(
            &p("named"),
            prio,
            json!({"sources": ["$web", "$web", "198.51.100.0/24"], "destinations": ["$db"], "protocol": "tcp", "ports": ["5432"], "log": true}),
        ),
        rule(
            &p("ifaces"),
            prio,
            json!({"applied_to": ["tap*", "tap1", "vnet-x.2"], "direction": "both", "protocol": "tcp", "ports": ["80", "443"], "action": "reject", "log": true}),
        ),
        rule(
            &p("ifall"),
            prio,
            json!({"applied_to": ["*"], "direction": "out", "sources": ["$web"], "action": "drop"}),
        ),
        rule(&p("off"), prio, json!({"disabled": true})),
    ]
}

fn base_rule_set() -> Value {
    let mut rules = shapes("a-", 100);
    rules.extend((0..40).map(|i| {
        rule(
            &format!("filler{i:02}"),
            200 + i,
            json!({"protocol": "tcp", "ports": [format!("{}", 3000 + i)]}),
        )
    }));
    json!({
        "generation": 1,
        "defaults": {"in": "drop", "out": "allow", "forward": "drop"},
        "address_sets": {
            "web": ["10.1.0.0/24", "10.1.2.3", "2001:db8:1::/64"],
            "db": ["10.2.0.5", "2001:db8:2::5"],
            "old": ["10.7.0.0/16"],
        },
        "rules": rules,
    })
}

/// Adds every shape again (between kept rules and at the end of a bucket), replaces some
/// rules and deletes others, makes a set (used by a new rule) and deletes one, and changes
/// set elements: rule changes in existing chains with set changes, the netlink path's case.
fn patch_data() -> Value {
    let mut upserts = shapes("b-", 150);
    upserts.extend(shapes("z-", 250));
    // Changed in place (the same priority), and moved (another priority).
    upserts.push(rule(
        "filler03",
        203,
        json!({"protocol": "udp", "ports": ["3003"], "action": "reject"}),
    ));
    upserts.push(rule(
        "filler05",
        231,
        json!({"protocol": "tcp", "ports": ["3005"]}),
    ));
    // Sent again unchanged: kept, with its counters.
    upserts.push(rule(
        "filler07",
        207,
        json!({"protocol": "tcp", "ports": ["3007"]}),
    ));
    // A rule on a set the same patch makes.
    upserts.push(rule(
        "fresh-user",
        208,
        json!({"sources": ["$fresh"], "action": "drop"}),
    ));
    json!({
        "base_generation": 1,
        "generation": 2,
        "upsert_rules": upserts,
        "delete_rules": ["a-udpset", "a-ifaces", "filler10", "no-such-rule"],
        "set_address_sets": {"fresh": ["172.16.0.0/12", "10.0.0.1", "255.255.255.254/31", "2001:db8:f::1"]},
        "add_addresses": {"web": ["10.1.9.0/24"]},
        "remove_addresses": {"db": ["10.2.0.5"]},
        "delete_address_sets": ["old"],
    })
}

fn rule_set(v: &Value) -> RuleSet {
    decode_stored_rule_set(&serde_json::to_vec(v).unwrap()).expect("a valid rule set")
}

fn patch(v: &Value) -> Patch {
    decode_stored_patch(&serde_json::to_vec(v).unwrap()).expect("a valid patch")
}

fn ctx(table: &str) -> RenderCtx {
    RenderCtx {
        table: table.into(),
        brokers: vec![],
        resolvers: vec![],
        failsafe_in: vec![],
        failsafe_out: vec![],
    }
}

/// A context with every kind of failsafe rule, of both families.
fn failsafe_ctx(table: &str) -> RenderCtx {
    use rampart::firewall::render::FailsafeProto::{Tcp, Udp};
    RenderCtx {
        table: table.into(),
        brokers: vec![
            ("192.0.2.10".parse().unwrap(), 5671),
            ("2001:db8::10".parse().unwrap(), 5671),
        ],
        resolvers: vec![
            "192.0.2.53".parse().unwrap(),
            "2001:db8::53".parse().unwrap(),
        ],
        failsafe_in: vec![(Tcp, 22), (Udp, 4789)],
        failsafe_out: vec![(Udp, 123)],
    }
}

fn nft() -> Nft {
    Nft::new(std::path::Path::new("nft"))
}

/// A firewall on `table` with `rs` applied, in the calling thread's namespace.
async fn applied_firewall(table: &str, rs: &RuleSet) -> Result<Firewall> {
    let mut fw = Firewall::new(nft(), ctx(table), Limits::default(), RuleSet::default());
    let ApplyPlan::Replace { batch, layout } = fw.plan_apply(rs)? else {
        bail!("a first rule set replaces the empty one");
    };
    fw.apply_replace(batch, rs, &layout).await?;
    fw.commit_replace(rs.clone(), layout);
    Ok(fw)
}

/// The table's listing with its name taken out, so that two tables compare.
fn listing(ns: &Netns, table: &str) -> Result<String> {
    let text = ns.nft_table(table).context("table listed")?;
    Ok(text.replacen(&format!("table inet {table} "), "table inet T ", 1))
}

/// A single-threaded runtime for a namespace thread (its blocking threads, and the nft
/// processes it starts, inherit the namespace).
fn current_thread() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Runs the future `f` makes to its end on a thread inside namespace `ns`.
fn block_on_in_ns<F>(ns: &str, f: impl FnOnce() -> F + Send + 'static) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    in_ns(ns, move || current_thread()?.block_on(f()))
}

/// Runs nft in the calling thread's namespace.
fn nft_here(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("nft").args(args).output()?;
    ensure!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The kernel handle of the rule commented `id` in `table`: a rule that keeps its handle
/// is the same kernel object, with its counter.
fn handle_of(table: &str, id: &str) -> Result<u64> {
    let text = nft_here(&["-a", "list", "table", "inet", table])?;
    let line = text
        .lines()
        .find(|l| l.contains(&format!("comment \"{id}\"")))
        .with_context(|| format!("{id} in {table}"))?;
    Ok(line
        .rsplit("# handle ")
        .next()
        .context("a handle")?
        .trim()
        .parse()?)
}

/// Fails with the first differing lines unless the two listings are the same.
fn same_listing(what: &str, netlink: &str, nft: &str) -> Result<()> {
    if netlink == nft {
        return Ok(());
    }
    let diff: Vec<String> = netlink
        .lines()
        .zip(nft.lines())
        .filter(|(a, b)| a != b)
        .take(8)
        .map(|(a, b)| format!("netlink: {a}\n    nft: {b}"))
        .collect();
    bail!(
        "{what}: netlink and nft listings differ ({} vs {} lines):\n{}",
        netlink.lines().count(),
        nft.lines().count(),
        diff.join("\n")
    )
}

/// Each base chain's rules in the order packets meet them, jumps followed.
fn flattened(listing: &str) -> Vec<String> {
    let mut chains: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    let mut current = None;
    for line in listing.lines().map(str::trim) {
        if let Some(name) = line
            .strip_prefix("chain ")
            .and_then(|l| l.strip_suffix(" {"))
        {
            current = Some(name);
            chains.insert(name, vec![]);
        } else if line == "}" {
            current = None;
        } else if let Some(c) = current.filter(|_| !line.is_empty() && !line.starts_with("type ")) {
            chains.get_mut(c).expect("opened").push(line);
        }
    }
    fn walk(
        chains: &std::collections::HashMap<&str, Vec<&str>>,
        name: &str,
        out: &mut Vec<String>,
    ) {
        for line in chains.get(name).into_iter().flatten() {
            match line.strip_prefix("jump ") {
                Some(target) => walk(chains, target, out),
                None => out.push(line.to_string()),
            }
        }
    }
    let mut out = vec![];
    for base in ["input", "output", "forward"] {
        out.push(format!("-- {base}"));
        walk(&chains, base, &mut out);
    }
    out
}

fn every_shape() -> Result<()> {
    let ns = Netns::new("nlr");
    let (rs, p) = (rule_set(&base_rule_set()), patch(&patch_data()));
    block_on_in_ns(&ns.name, move || async move {
        let mut over_netlink = applied_firewall("nl", &rs).await?;
        let mut through_nft = applied_firewall("tx", &rs).await?;
        // Rules the patch keeps (untouched, or sent again unchanged) stay the same
        // kernel objects; rules it changes are new ones.
        let kept_before = (handle_of("nl", "a-tcp1")?, handle_of("nl", "filler07")?);
        let changed_before = handle_of("nl", "filler03")?;
        let plan = over_netlink.plan_patch(&p)?;
        let KernelChange::Rules { sets, buckets, .. } = &plan.kernel else {
            bail!("rule and element changes in existing chains go over netlink");
        };
        ensure!(
            buckets
                .iter()
                .any(|b| !b.delete.is_empty() && b.add.iter().any(|a| a.before.is_some())),
            "the patch deletes and inserts between kept rules"
        );
        ensure!(
            !sets.create.is_empty() && !sets.delete.is_empty(),
            "the patch makes and deletes sets over netlink: {sets:?}"
        );
        let (sets, buckets) = (sets.clone(), buckets.clone());
        tokio::task::spawn_blocking(move || edit::apply("nl", &sets, &buckets)).await??;
        over_netlink.commit_patch(plan);
        ensure!(
            (handle_of("nl", "a-tcp1")?, handle_of("nl", "filler07")?) == kept_before,
            "kept rules keep their handles"
        );
        ensure!(
            handle_of("nl", "filler03")? != changed_before,
            "a changed rule is new"
        );
        let plan = through_nft.plan_patch(&p)?;
        let KernelChange::Rules { text, .. } = &plan.kernel else {
            bail!("same plan on the other table");
        };
        nft().apply(text).await?;
        through_nft.commit_patch(plan);
        // And a third table made whole from the patched rule set: same order, same rules.
        let whole = applied_firewall("fr", over_netlink.current()).await?;
        drop(whole);
        Ok(())
    })?;
    let (nl, tx, fr) = (
        listing(&ns, "nl")?,
        listing(&ns, "tx")?,
        listing(&ns, "fr")?,
    );
    same_listing("the patched tables", &nl, &tx)?;
    ensure!(flattened(&nl).len() > 150, "the listing was read: {nl}");
    // Bucket boundaries differ from a fresh layout's; the rules each hook runs through, in
    // order, must not.
    ensure!(
        flattened(&nl) == flattened(&fr),
        "the patched table runs other rules than the patched rule set made whole:\n{nl}\n---\n{fr}"
    );
    for id in ["b-tcpiv", "z-litset", "b-ifaces", "filler03"] {
        ensure!(
            nl.contains(&format!("comment \"{id}\"")),
            "{id} is in the table"
        );
    }
    ensure!(!nl.contains("comment \"a-udpset\""), "a-udpset is gone");
    Ok(())
}

fn changed_behind_our_back() -> Result<()> {
    let ns = Netns::new("nlb");
    let (rs, p) = (rule_set(&base_rule_set()), patch(&patch_data()));
    block_on_in_ns(&ns.name, move || async move {
        let mut fw = applied_firewall("nl", &rs).await?;
        let plan = fw.plan_patch(&p)?;
        let KernelChange::Rules { sets, buckets, .. } = &plan.kernel else {
            bail!("a netlink plan");
        };
        // Someone adds a rule to a chain the patch edits: handles no longer line up.
        let chain = buckets[0].chain.clone();
        nft_here(&[
            "insert", "rule", "inet", "nl", &chain, "tcp", "dport", "1", "drop",
        ])?;
        let (e, b) = (sets.clone(), buckets.clone());
        let refused = tokio::task::spawn_blocking(move || edit::apply("nl", &e, &b)).await?;
        ensure!(
            matches!(refused, Err(edit::EditError::Differs { .. })),
            "{refused:?}"
        );
        // A batch the kernel refuses halfway (a handle that is not there, then a valid
        // addition) is reported, and nothing of it is applied.
        let before = nft_here(&["list", "chain", "inet", "nl", &chain])?;
        let mut bogus = rampart::sys::nfrule::TableBatch::new("nl", None, 1);
        bogus.delete_rule(&chain, u64::from(u32::MAX));
        bogus.add_rule(&chain, &buckets[0].add[0].rule);
        let refused = bogus.send();
        ensure!(
            matches!(&refused, Err(rampart::sys::nfnl::NfnlError::Refused(e)) if e.raw_os_error() == Some(2)),
            "{refused:?}"
        );
        ensure!(
            nft_here(&["list", "chain", "inet", "nl", &chain])? == before,
            "nothing applied"
        );
        // The firewall's own apply falls back to text and still gets the patch in.
        fw.apply_kernel(&plan.kernel).await?;
        fw.commit_patch(plan);
        Ok(())
    })?;
    let after = listing(&ns, "nl")?;
    ensure!(
        after.contains("comment \"z-tcpiv\""),
        "the patch went in as text"
    );
    ensure!(
        !after.contains("tcp dport 1 drop"),
        "the text rewrote the chain"
    );
    Ok(())
}

/// The whole-table batch against `nft -f` of the same rule set's text, for the shapes'
/// rule set before and after the patch, an empty one, and one with empty sets and all
/// defaults dropping, each with every kind of failsafe rule.
fn whole_table() -> Result<()> {
    use rampart::firewall::bytecode::full_table;
    use rampart::firewall::layout::Layout;
    use rampart::firewall::render::render_full;
    let ns = Netns::new("nlw");
    let base = rule_set(&base_rule_set());
    let mut patched = base.clone();
    let p = patch(&patch_data());
    let empty = rule_set(&json!({"generation": 1}));
    let stark = rule_set(
        &json!({"generation": 1, "defaults": {"in": "drop", "out": "drop", "forward": "drop"},
        "address_sets": {"none": [], "v6only": ["2001:db8::/32"], "top": ["255.255.255.0/24", "::/0"]},
        "rules": [rule("x", 1, json!({"sources": ["$none", "$v6only", "$top"]}))]}),
    );
    in_ns(&ns.name, move || -> Result<()> {
        current_thread()?.block_on(async {
            let mut fw = applied_firewall("p", &base).await?;
            let plan = fw.plan_patch(&p)?;
            fw.apply_kernel(&plan.kernel).await?;
            fw.commit_patch(plan);
            patched = fw.current().clone();
            Ok::<_, anyhow::Error>(())
        })?;
        for (i, rs) in [&base, &patched, &empty, &stark].into_iter().enumerate() {
            let layout = Layout::build(rs.rules.values());
            let (bytes, acked) =
                full_table(rs, &layout, &failsafe_ctx("nl"), 1, &mut Default::default());
            rampart::sys::nfnl::send_batch(&bytes, acked)
                .with_context(|| format!("rule set {i} over netlink"))?;
            let text = render_full(rs, &layout, &failsafe_ctx("tx"));
            let path = std::env::temp_dir().join(format!("rampart-nlw-{}.nft", std::process::id()));
            std::fs::write(&path, text)?;
            nft_here(&["-f", &path.display().to_string()])?;
            let _ = std::fs::remove_file(&path);
            let nl = nft_here(&["list", "table", "inet", "nl"])?.replacen(
                "table inet nl ",
                "table inet T ",
                1,
            );
            let tx = nft_here(&["list", "table", "inet", "tx"])?.replacen(
                "table inet tx ",
                "table inet T ",
                1,
            );
            ensure!(nl.lines().count() > 20, "rule set {i} listed: {nl}");
            same_listing(&format!("rule set {i}"), &nl, &tx)?;
        }
        Ok(())
    })
}
