//! Guest memory as the vhost-user handler maps it (shared by a session and its queues).

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory as the vhost-user handler maps it: replaced whole when the frontend
/// changes its memory table.
pub(crate) type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
