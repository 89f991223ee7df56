//! What `rampart up DIR` decides, without touching a process: which folder it accepts
//! ([`check_policy`], [`check_addresses`], [`check_edit`]), where its state lives and how
//! each child is started ([`StateLayout`], [`ca_args`], [`agent_args`], [`app_command`],
//! [`proxy_args`]), what an edit of the folder means ([`plan`]), and what it prints
//! ([`mesh_table`], [`workload_table`], [`describe_status`]).
//!
//! The binary's `up` (src/cli/up.rs) spawns, waits for, signals and reaps the processes.

mod check;
mod layout;
mod plan;
mod render;

pub use self::check::{
    DemoToken, EditCheck, PolicyCheck, changed_files, check_addresses, check_edit, check_free,
    check_policy, folder_fingerprint, read_demo_token,
};
pub use self::layout::{
    AppCommand, CA_AUDIENCE, CA_READY_MARKER, DEFAULT_ISSUER, MAX_SOCKET_PATH, StateLayout,
    TOKEN_REFRESH, TOKEN_TTL, agent_args, app_command, ca_args, proxy_args,
};
pub use self::plan::{Action, Role, plan};
pub use self::render::{describe_status, mesh_table, workload_table};
