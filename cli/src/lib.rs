//! The `vmblk` command line.
