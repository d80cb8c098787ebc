//! Ways for clients to reach the scheduler. A transport frames requests and
//! replies and owns its connections; queueing and inference are the
//! scheduler's, shared by every transport.

pub mod http;
pub mod inflight;
pub mod mqtt;
pub mod unix;
