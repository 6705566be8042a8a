"""Quickstart: the Python SDK against a local service.

kernelbox serve &              # or `make serve`; the SDK reads KERNELBOX_URL / KERNELBOX_API_KEY
python examples/quickstart.py
"""

from kernelbox import Client, ExecutionTimeout, render

with Client() as client, client.create_session() as session:  # the session is deleted at the end
    # Run code; variables persist between calls of a session.
    execution = session.execute("x = 21 * 2\nprint(x)")
    print(execution.status, execution.stdout, end="")  # ok 42
    print(session.execute("x + 1").results[0].data["text/plain"])  # 43

    # Output as it arrives: iterate the events...
    for event in session.stream("import time\nfor i in range(3):\n    print(i); time.sleep(0.2)"):
        print(event.type, getattr(event, "text", "").strip())  # stdout 0, stdout 1, ..., end
    # ...or pass callbacks.
    session.execute("print('streamed')", on_stdout=lambda text: print("->", text, end=""))

    # The code's errors are data (status, error); ask for exceptions if you prefer them.
    failed = session.execute("1 / 0")
    print(failed.status, failed.error.name)  # error ZeroDivisionError
    try:
        session.execute("while True: pass", timeout=1, raise_on_error=True)
    except ExecutionTimeout as exc:
        print("timed out:", exc, "| x is still", session.execute("x").results[0].data["text/plain"])

    # Files in the session's working directory.
    session.upload(b"a,b\n1,2\n3,4\n", "data.csv")
    print(session.execute("pd.read_csv('data.csv').sum().to_dict()").results[0].data["text/plain"])

    # Plots become images: fetch them as bytes or save them.
    plot = session.execute("plt.plot([1, 4, 9]); plt.title('squares'); plt.show()")
    print("saved", session.save_images(plot, "quickstart-images"))
    print(len(session.download(plot.images[0])), "bytes")

    # Model-ready text, rendered locally (no round trip): any envelope and style.
    print(render(execution, "tool_response"))
    print(render(failed, "plain"))
