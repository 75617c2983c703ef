//! A file-backed [`Store`](super::Store): being written.
