"""The default output is the service's own lines, the progress bar and real warnings: none of
Ray's per-rank report lines, Ray Data's plans and progress bars, or the PlacementGroupCleaner's
state-API warnings. (--verbose brings Ray's back: test_faults_and_elastic's 1-worker run.)"""

RAY_NOISE = ("Reporting training result", "Failed to query Ray Train Controller actor state",
             "PlacementGroupCleaner", "Running Dataset", "Execution plan of Dataset",
             "Starting execution of Dataset")


def test_default_run_prints_the_service_not_ray(runs):
    for run in (runs.straight, *runs.chain):
        out = run.out
        assert "📈 Starting optimized training loop..." in out and "🏁 Done: step" in out
        assert "Training: 100%" in out  # the progress bar
        for noise in RAY_NOISE:
            assert noise not in out, (noise, out[-3000:])
    lines = [line for line in runs.straight.out.splitlines() if line.strip()]
    assert len(lines) < 60, "\n".join(lines)
