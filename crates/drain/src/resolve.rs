//! A switchover whose outcome the source lost (its migrate answered 502: the VM is paused on
//! the source, and may be running on the destination). Only the destination's agent can
//! settle it: asked to abandon the migration, it either proves the VM never ran there (its
//! receiver is gone without having started the VM), and the source resumes it, or says the VM
//! runs there, and the stale copy on the source is discarded. Anything else leaves the VM
//! paused on the source and says so: never two copies running, never none by our hand.
use std::time::Duration;

use host::IncomingFate;
use unixhttp::ApiError;

use crate::survey::Survey;

/// Times the destination is asked before the VM is left unresolved.
const ASK_TIMES: u32 = 5;

pub enum Verdict {
    /// It runs on the destination; the copy on the source is gone.
    Moved { verified: bool, note: String },
    /// It never ran on the destination and runs on the source again: a failed attempt.
    Resumed(String),
    /// Paused on the source until an operator decides.
    Unresolved(String),
    /// Its process on the source died and it does not run on the destination: gone.
    Lost(String),
}

/// What the destination's agent says of migration `session`, asked to abandon it if it is
/// still arriving: a final fate (`Confirmed`, `NeverRan` or `Unknown`), or, after
/// [`ASK_TIMES`] tries a second apart, why there is none.
fn settled_fate(d: &crate::survey::Dest, session: u64) -> Result<IncomingFate, String> {
    let Some(client) = &d.client else {
        return Err(format!("{}'s agent is not reachable from here", d.name));
    };
    let mut last = String::from("no answer");
    for _ in 0..ASK_TIMES {
        match client.incoming(session, true) {
            Ok(IncomingFate::Arriving) => last = "it is still arriving there".into(),
            Ok(fate) => return Ok(fate),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Err(last)
}

/// What an agent's refusal says, without the HTTP wrapping.
fn message(err: &ApiError) -> String {
    match err {
        ApiError::Refused { message, .. } => message.clone(),
        e => e.to_string(),
    }
}

/// The VM's process on the source died during its migration (the source's agent lists it
/// `failed`): it runs on the destination if that host confirms it, and nowhere otherwise.
pub fn source_died(s: &Survey, dest: usize, name: &str, session: u64, err: &ApiError) -> Verdict {
    let d = &s.dests[dest];
    let died = message(err);
    match settled_fate(d, session) {
        Ok(IncomingFate::Confirmed) => verified_there(s, dest, name, &died),
        Ok(_) => Verdict::Lost(format!("{died}; it never ran on {}", d.name)),
        Err(last) => Verdict::Lost(format!(
            "{died}; {} could not say whether it runs there ({last})",
            d.name
        )),
    }
}

pub fn resolve(s: &Survey, dest: usize, name: &str, session: u64, err: &ApiError) -> Verdict {
    let d = &s.dests[dest];
    let lost = message(err);
    if d.client.is_none() {
        return settled_by_source(s, dest, name, lost);
    }
    match settled_fate(d, session) {
        Ok(IncomingFate::Confirmed) => confirmed(s, dest, name, &lost),
        Ok(IncomingFate::NeverRan) => match s.client.resume(name) {
            Ok(_) => Verdict::Resumed(format!(
                "{lost}; {} proved it never ran there, so it runs here again",
                d.name
            )),
            Err(e) => Verdict::Unresolved(format!(
                "{lost}; it never ran on {}, but resuming it here failed: {e}",
                d.name
            )),
        },
        Ok(_) => Verdict::Unresolved(format!(
            "{lost}; {} does not know migration {session:#x}: left paused here",
            d.name
        )),
        Err(last) => Verdict::Unresolved(format!(
            "{lost}; {} could not settle it ({last}): left paused here",
            d.name
        )),
    }
}

/// A cluster member's switchover, which the source's agent settled through the cluster
/// before it answered: the VM gone from the source moved (the agent discards its copy only
/// when the cluster names the destination), one running there again stayed.
fn settled_by_source(s: &Survey, dest: usize, name: &str, lost: String) -> Verdict {
    let d = &s.dests[dest];
    match s.client.list() {
        Ok(vms) => match vms.into_iter().find(|v| v.name == name) {
            None => Verdict::Moved {
                verified: false,
                note: format!(
                    "moved to {}; the cluster settled its lost switchover ({lost})",
                    d.name
                ),
            },
            Some(v) if v.state == "running" => Verdict::Resumed(lost),
            Some(v) => Verdict::Unresolved(format!("{lost}; it is {} here", v.state)),
        },
        Err(e) => Verdict::Unresolved(format!("{lost}; the source's agent: {e}")),
    }
}

/// The VM runs on the destination: discard the source's copy and ask the guest there to
/// verify its memory.
fn confirmed(s: &Survey, dest: usize, name: &str, lost: &str) -> Verdict {
    let d = &s.dests[dest];
    // Not found: the source's agent discarded it already (the cluster told it the VM moved).
    if let Err(e) = s.client.discard(name).or_else(|e| match e.status() {
        Some(404) => Ok(serde_json::Value::Null),
        _ => Err(e),
    }) {
        return Verdict::Unresolved(format!(
            "{lost}; it runs on {}, but discarding the stale copy here failed: {e}",
            d.name
        ));
    }
    verified_there(s, dest, name, lost)
}

/// The VM runs on the destination (its switchover's answer was lost on the way): ask its guest
/// there to verify its memory.
fn verified_there(s: &Survey, dest: usize, name: &str, lost: &str) -> Verdict {
    let d = &s.dests[dest];
    let verified = d
        .client
        .as_ref()
        .and_then(|c| c.list().ok())
        .and_then(|vms| vms.into_iter().find(|v| v.name == name))
        .and_then(|v| {
            vmm::api::Client::new(v.api)
                .verify(Duration::from_secs(60))
                .ok()
        })
        .is_some_and(|r| matches!(r.last_verify, Some(vmm::devices::VerifyResult::Ok { .. })));
    Verdict::Moved {
        verified,
        note: format!(
            "moved to {}; its switchover answer was lost ({lost}) and {} confirmed it",
            d.name, d.name
        ),
    }
}
