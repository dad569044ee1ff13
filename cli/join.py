from __future__ import annotations

from pathlib import Path

import typer

NAME = "join"


def run(superlink: str = typer.Option(..., "--superlink", help="HOST:PORT of the SuperLink"),
        data: Path = typer.Option(None, "--data", help="this client's concept folder (to train on)"),
        words: str = typer.Option(None, "--words", help="the concept's new words, e.g. '<cat1> <cat2>'"),
        class_word: str = typer.Option(None, "--class-word"),
        package: Path = typer.Option(None, "--package", help="a ready package to upload instead of training (e.g. "
                                                             "from mixshow import-lora); replaces --data/--words/"
                                                             "--class-word"),
        base: Path = typer.Option(..., "--base", help="the base model (same weights as the server's)"),
        name: str = typer.Option(None, "--name", help="this client's name (default: the data folder's or the "
                                                      "package's name)"),
        work_dir: Path = typer.Option(Path.home() / ".mixshow" / "client", "--work-dir"),
        port: int = typer.Option(9094, "--port", help="the SuperNode's local runtime port"),
        root_cert: Path = typer.Option(None, "--root-cert", help="CA certificate of the SuperLink's TLS"),
        insecure: bool = typer.Option(False, "--insecure"),
        auth_key: Path = typer.Option(None, "--auth-key", help="SuperNode private key for node authentication"),
        train_config: Path = typer.Option(None, "--train-config", help="YAML of this client's training settings "
                                                                       "(the round sets steps and resolution)"),
        device: str = typer.Option("cpu", "--device"), dtype: str = typer.Option("float32", "--dtype")) -> None:
    """Join a federation: check the data, then run a SuperNode with this client's node config (foreground)."""
    import os
    import sys

    from cli.options import words_list
    from client.config import load_config
    from client.dataset import load_examples
    from client.round import check_client_name
    from shared.base import check_base_folder
    from shared.errors import InvalidArgument, UserError
    from shared.package import read_package
    from shared.validate import number

    number("port", port, 1, 65535, integer=True)
    if package is not None:
        if data is not None or words is not None or class_word is not None:
            raise UserError("give --package or --data/--words/--class-word, not both")
        read_package(package)  # a bad package fails here, not in the first round
        name = name or package.resolve().name
    else:
        for flag, value in (("--data", data), ("--words", words), ("--class-word", class_word)):
            if value is None:
                raise UserError(f"{flag} is required (or give a ready --package)")
        if not words_list(words):
            raise InvalidArgument("words", "is empty: give the concept's new words, e.g. '<cat1> <cat2>'")
        load_examples(data)
        name = name or data.resolve().name
    check_client_name(name)
    if Path(base).is_dir():
        check_base_folder(Path(base))
    if train_config is not None:
        load_config(train_config, {})  # a bad file fails here, not in the first round
    if not insecure and root_cert is None:
        raise UserError("--root-cert CA.pem is required unless --insecure")
    node = {"name": name, "base": str(Path(base).resolve()), "work-dir": str(work_dir.resolve()), "device": device,
            "dtype": dtype}
    if package is not None:
        node["package"] = str(package.resolve())
    else:
        node.update({"data-dir": str(data.resolve()), "words": words, "class-word": class_word})
    if train_config is not None:
        node["train-config"] = str(train_config.resolve())
    config = " ".join(f'{k}="{v}"' for k, v in node.items())
    command = [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", superlink, "--port", str(port),
               "--node-config", config]
    command += ["--insecure"] if insecure else ["--root-certificates", str(root_cert)]
    if auth_key:
        command += ["--auth-supernode-private-key", str(auth_key)]
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.execv(command[0], command)
