//! The nfnetlink set-element encoder: any batch of changes (keys of 4 or 16 bytes, several
//! sets, more elements than one message holds) decodes back to exactly what was encoded,
//! and the last message, only, asks for an ack.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rampart::sys::nfnl::{Element, SetChange, decode_batch, encode_batch};

fn name(u: &mut Unstructured, prefix: &str) -> Result<String> {
    let len = u.int_in_range(1..=24)?;
    let mut s = prefix.to_string();
    for _ in 0..len {
        s.push(*u.choose(b"abcdefghijklmnopqrstuvwxyz0123456789_-")? as char);
    }
    Ok(s)
}

fn elements(u: &mut Unstructured, width: usize) -> Result<Vec<Element>> {
    // As many as the input holds (so small inputs stay fast), up to 600: past the 512
    // elements of one message.
    let n = u.arbitrary_len::<u8>()?.div_ceil(width + 1).min(600);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut key = vec![0u8; width];
        u.fill_buffer(&mut key)?;
        out.push(Element {
            key,
            end: u.arbitrary()?,
            open: u.arbitrary()?,
        });
    }
    Ok(out)
}

fn changes(u: &mut Unstructured) -> Result<(String, Vec<SetChange>)> {
    let table = name(u, "rampart")?;
    let mut out: Vec<SetChange> = vec![];
    for i in 0..u.int_in_range(0..=4)? {
        let width = if u.arbitrary()? { 4 } else { 16 };
        // Distinct names, as the planner gives (one change per kernel set).
        let set = format!("{}{i}", name(u, if width == 4 { "as4_" } else { "as6_" })?);
        let change = SetChange {
            set,
            delete: elements(u, width)?,
            add: elements(u, width)?,
        };
        if !change.delete.is_empty() || !change.add.is_empty() {
            out.push(change);
        }
    }
    Ok((table, out))
}

fuzz_target!(|input: &[u8]| {
    let mut u = Unstructured::new(input);
    let Ok((table, changes)) = changes(&mut u) else {
        return;
    };
    let first_seq = u.arbitrary::<u32>().unwrap_or(1) >> 1;
    let (bytes, acked) = encode_batch(&table, &changes, first_seq);
    let messages: usize = changes
        .iter()
        .map(|c| c.delete.len().div_ceil(512) + c.add.len().div_ceil(512))
        .sum();
    // Only the last message asks for an ack: the kernel reports every failure anyway.
    let last = (messages > 0).then(|| first_seq + messages as u32);
    assert_eq!(acked, last.into_iter().collect::<Vec<_>>());
    let (back_table, back) = decode_batch(&bytes).expect("an encoded batch decodes");
    if !changes.is_empty() {
        assert_eq!(back_table, table);
    }
    assert_eq!(back, changes);
});
