"""Writes kaggle_kernel/notebook/master_all_avsr.ipynb from the script: a settings cell, then the script itself.
Run it after each change to master_all_avsr.py (a test checks that the notebook holds today's script):

    python kaggle_kernel/make_notebook.py
"""
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = Path(__file__).with_name("notebook") / "master_all_avsr.ipynb"
INTRO = """# Arabic lip reading: master_all_avsr

1. **Data**: attach your clips as a dataset (*Add Input*): mouth crops and their CSV labels in LRC-AR's layout
   are found anywhere under `/kaggle/input`.
2. **Settings**: edit the next cell: the script's flags, as on its command line (the last cell's `--help` lists
   them; `--mode test`, `decode`, `lm` ... run the other jobs).
3. **Run all** (*Save Version* for a run that goes on without you; GPU T4 x2 trains in two processes by itself).
4. **Outputs** go to `/kaggle/working/run`: checkpoints, `metrics.csv`, `curves.png`, `predictions.csv`,
   `diagnostics/`. Attach this notebook's output to a later session and add `--resume` to continue it.
5. **A page** to lip-read your own videos with the model: the last cell (`SERVE = True`)."""
SETTINGS = '''# the script's flags (python master_all_avsr.py --help); here the GPU recipe of the README
SETTINGS = [
    "--preset", "small", "--input-size", "88", "--epochs", "80", "--warmup-epochs", "5",
    "--ctc-weight-schedule", "1-25:0.7,26-50:0.5,51-:0.4>0.2", "--average-last", "10",
    "--time-mask-window", "6", "--augment-from", "26",
]
import os, shlex
os.environ["AVSR_ARGS"] = shlex.join(SETTINGS)'''

SERVE = '''# Lip-read your own videos on a page with this run's model (--mode serve): SERVE = True, then run this cell.
# The server runs in the background while the kernel does. Kaggle gives it no address of its own: with Internet
# on (Settings), TUNNEL = True opens a public one through localtunnel (npm); its page asks each visitor once for
# the password printed below (this session's public IP). Anyone with the address can use the page meanwhile.
# The server answers only to the names it is given (a guard against DNS rebinding): the tunnel's are *.loca.lt.
SERVE, TUNNEL, PORT = False, False, 8000
if SERVE:
    server = main(SETTINGS + ["--mode", "serve", "--port", str(PORT)]
                  + (["--serve-allowed-hosts", ".loca.lt"] if TUNNEL else []))
    if TUNNEL:
        import subprocess, urllib.request
        tunnel = subprocess.Popen(["npx", "--yes", "localtunnel", "--port", str(PORT)], stdout=subprocess.PIPE,
                                  text=True)
        password = urllib.request.urlopen("https://loca.lt/mytunnelpassword").read().decode()
        print(tunnel.stdout.readline().strip(), "- password:", password)'''


def notebook() -> nbformat.NotebookNode:
    script = (ROOT / "master_all_avsr.py").read_text(encoding="utf-8")
    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(INTRO), nbformat.v4.new_code_cell(SETTINGS),
                                           nbformat.v4.new_code_cell(script), nbformat.v4.new_code_cell(SERVE)])
    book.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                     "language_info": {"name": "python"}}
    for n, cell in enumerate(book.cells):
        cell["id"] = f"cell-{n}"  # fixed ids: the file changes only when the script or the settings do
    return book


if __name__ == "__main__":
    nbformat.write(notebook(), NOTEBOOK)
    print(f"Wrote {NOTEBOOK}")
