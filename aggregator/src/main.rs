//! `millrace-aggregator`: central ingest, dedup and log writer.
fn main() -> anyhow::Result<()> {
    anyhow::bail!("millrace-aggregator: not built yet in this release")
}
