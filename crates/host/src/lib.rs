//! livemig's host agent: one per host (as libvirtd), it runs the host's VMs, each in its own
//! `livemig run` process, takes any number of incoming VMs on one listening address (each
//! handed to its own `livemig receive` process), sends its VMs away when asked, and answers
//! for all of it on a private API socket that `livemig host` and `livemig drain` use.
//!
//! - [`agent`]: the agent itself (VM records, processes, admission, routes).
//! - [`api`]: its API table, the types on it and a typed client.
//! - [`status`]: the milestones an incoming VM's receiver records for the agent.
//! - [`probe`]: measuring what a link carries, for plans and ETAs.
//! - [`cpu`]: what its CPU does, counted for drains that must leave guests their share.
//! - [`child`]: starting, watching and reaping livemig (and QEMU) processes.
pub mod agent;
pub mod api;
pub mod child;
pub mod cpu;
pub mod probe;
pub mod status;

pub use agent::{Agent, AgentConfig, AgentError};
pub use api::{Capacity, HostClient, IncomingFate, RunRequest, VmInfo};
