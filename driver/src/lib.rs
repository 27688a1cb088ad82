//! vmblkd library.
