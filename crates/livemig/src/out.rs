//! What the command line prints on stdout. A reader that stops early (`| grep -q running`,
//! `| head`) ends the command quietly, as a command-line tool should, not with a panic.
use std::io::Write;

/// Prints `text` and a newline on stdout. A closed pipe ends the process quietly, with
/// status 0 (its reader had what it wanted); any other failure to write says so and exits 1.
pub fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let written = writeln!(out, "{text}").and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("livemig: writing to stdout: {e}");
            std::process::exit(1)
        }
    }
}
