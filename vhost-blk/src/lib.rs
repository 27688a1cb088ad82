//! vhost-user-blk export.
