"""`cluster/score-sample.sh` after a local run on the same machine: the local run left ~/.ray/auth_token, so
the `ray start --head` that follows requires the token. The script sends it (RAY_AUTH_MODE=token when the
file exists and the mode is unset), and a job submitted with a relative --output, which would land in Ray's
temporary copy of the working directory, is refused."""
import subprocess
import time

from helpers import sample_rows
from ma_agiqa.score_table import read_scores
from ray_clusters import REPO, RAY, env, free_port, kill_session, start_node


def test_score_sample_sh_submits_to_a_head_that_requires_the_local_token(tmp_path):
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(generate_new_authentication_token())  # as a local run leaves it
    user = env(HOME=str(home))
    user.pop("RAY_AUTH_MODE")  # the user's shell: no mode set
    gcs_port, dash_port = free_port(), free_port()
    head = start_node("--head", "--num-cpus", 2, "--port", gcs_port, "--dashboard-host", "127.0.0.1",
                      "--dashboard-port", dash_port, "--include-dashboard", "true",
                      # the agent's default port (52365) may be another cluster's on this machine
                      "--dashboard-agent-listen-port", free_port(), environ=user)
    dashboard = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 90
        while True:  # the dashboard's job API takes seconds to come up; then, without the token: refused
            bare = subprocess.run([RAY, "job", "list", "--address", dashboard], env=user, capture_output=True,
                                  text=True, timeout=120)
            said = bare.stdout + bare.stderr
            if "401" in said or "uthentication" in said or time.time() > deadline:
                break
            time.sleep(2)
        assert bare.returncode != 0 and ("401" in said or "uthentication" in said), said[-2000:]

        out = tmp_path / "sample-scores"
        deadline = time.time() + 90
        while True:  # the job agent comes up after the dashboard
            sample = subprocess.run(["bash", "cluster/score-sample.sh"], cwd=REPO, capture_output=True, text=True,
                                    timeout=600, env=dict(user, RAY_ADDRESS=dashboard, OUTPUT=str(out)))
            if "No available agent" not in sample.stdout + sample.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert sample.returncode == 0, (sample.stdout + sample.stderr)[-3000:]
        assert f"score table: {out} ({len(sample_rows())} rows" in sample.stdout
        assert read_scores(str(out)).num_rows == len(sample_rows())

        relative = subprocess.run(
            [RAY, "job", "submit", "--address", dashboard, "--working-dir", ".", "--", "python", "-m", "jobs.score",
             "--manifest", "samples/agiqa3k/manifest.jsonl", "--image-root", "samples/agiqa3k", "--model", "tiny-random", "--allow-untrained",
             "--output", "outputs/sample-scores"],
            cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(user, RAY_AUTH_MODE="token"))
        said = relative.stdout + relative.stderr
        assert relative.returncode != 0 and "inside the temporary copy of the working directory" in said, said[-3000:]
        assert "Traceback" not in said
    finally:
        kill_session(head)
