//! placeholder until the keys helper lands
