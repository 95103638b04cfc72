"""What infra/ must guarantee, one check per concern, each a plain function that raises AssertionError.

The tests run every check on the real templates (it must pass) and on mutated copies (it must fail),
so a check that stopped looking would be caught too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shared.settings import SETTINGS
from tests.infra.bicep import Infra, Template, accessor_chain, call, identifiers

ROLES = {
    "Key Vault Secrets User": "4633458b-17de-408a-b874-0445c86b69e6",
    "Key Vault Secrets Officer": "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
    "Key Vault Certificates Officer": "a4417e6f-fecd-4de8-b567-7b0420556985",
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "Storage Blob Data Contributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
    "Storage Queue Data Contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "Storage Table Data Contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
}
VAULT = "Microsoft.KeyVault/vaults"
STORAGE = "Microsoft.Storage/storageAccounts"
CONTAINER = f"{STORAGE}/blobServices/containers"
APP_INSIGHTS = "Microsoft.Insights/components"
# The containers the Functions host and the code use; each is created in storage.bicep, so the app's
# container-scoped roles never need the account-wide right to create one.
REQUIRED_CONTAINERS = {"azure-webjobs-hosts", "azure-webjobs-secrets", "reconciliation", "bulk-records",
                       "webhook-replay"}

# Exactly these, no more: (role, type of the resource it is scoped to).
APP_IDENTITY_ROLES = {
    (ROLES["Key Vault Secrets User"], VAULT),
    (ROLES["Storage Blob Data Owner"], CONTAINER),  # per container, never the whole account
    (ROLES["Storage Queue Data Contributor"], STORAGE),
    (ROLES["Storage Table Data Contributor"], STORAGE),
    (ROLES["Monitoring Metrics Publisher"], APP_INSIGHTS),
}
DEPLOYER_ROLES = {
    (ROLES["Key Vault Secrets Officer"], VAULT),
    (ROLES["Key Vault Certificates Officer"], VAULT),  # certificate mode only: create/import the certificate
    (ROLES["Storage Blob Data Contributor"], STORAGE),
    (ROLES["Storage Queue Data Contributor"], STORAGE),
}

# Settings the Functions host reads (not the app's code) and Flex Consumption requires or allows.
HOST_SETTINGS = {
    "AzureWebJobsStorage__credential",
    "AzureWebJobsStorage__clientId",
    "AzureWebJobsStorage__blobServiceUri",
    "AzureWebJobsStorage__queueServiceUri",
    "AzureWebJobsStorage__tableServiceUri",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
    "PYTHON_THREADPOOL_THREAD_COUNT",  # the Python worker's
}
# Rejected or meaningless on Flex Consumption, or a shared-key connection string.
FORBIDDEN_SETTINGS = {
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_EXTENSION_VERSION",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_CONTENTSHARE",
    "AzureWebJobsStorage",
}
# Site properties Flex Consumption rejects outright (ARM error 51021, "... for Flex Consumption sites is
# invalid") or lists as not valid: "Flex Consumption plan deprecations" in the Functions app settings
# reference. It has no FTP endpoint; runtime and scale live in functionAppConfig.
FLEX_REJECTED_SITE_CONFIG = {
    "ftpsState",
    "alwaysOn",
    "linuxFxVersion",
    "windowsFxVersion",
    "use32BitWorkerProcess",
    "netFrameworkVersion",
    "javaVersion",
    "powerShellVersion",
    "pythonVersion",
    "preWarmedInstanceCount",
    "functionAppScaleLimit",
    "functionsRuntimeScaleMonitoringEnabled",
    "minimumElasticInstanceCount",
    "vnetRouteAllEnabled",
}
FLEX_REJECTED_SITE_PROPERTIES = {
    "containerSize",
    "isXenon",
    "vnetContentShareEnabled",
    "vnetImagePullEnabled",
    "vnetRouteAllEnabled",
    "vnetBackupRestoreEnabled",
}
# Public cloud: azure-identity's default authority is right, so the setting stays unset.
LEFT_UNSET = {"AZURE_AUTHORITY_HOST"}


def _key(name: str) -> str:
    """pycep keeps the quotes of a quoted object key: "'azd-service-name'" -> "azd-service-name"."""
    return name[1:-1] if len(name) > 1 and name[0] == name[-1] == "'" else name


def _main_source(infra: Infra, module: str, param: str) -> object:
    """The expression main.bicep passes as ``param`` to the module deployed from ``modules/<module>``."""
    symbol = infra.module_symbol(module)
    params = infra.main.module_params(symbol)
    assert param in params, f"main.bicep does not pass {param} to {module}.bicep"
    return params[param]


def _from_module_output(infra: Infra, expr: object, module: str, output: str) -> bool:
    return accessor_chain(expr) == [infra.module_symbol(module), "outputs", output]


def storage(infra: Infra) -> None:
    t = infra["storage"]
    account = t.resource(STORAGE)
    assert account.get("properties.allowSharedKeyAccess") is False, "shared keys must be off (Entra only)"
    assert account.get("properties.allowBlobPublicAccess") is False, "anonymous blob access must be off"
    assert account.get("properties.minimumTlsVersion") == "TLS1_2", "minimum TLS must be 1.2"
    assert account.get("properties.supportsHttpsTrafficOnly") is True, "HTTPS only"
    assert account.get("properties.defaultToOAuthAuthentication") is True

    containers = {c.symbol: c for c in t.resources(CONTAINER)}
    assert set(containers) == {"deploymentContainer", "appContainers"}, f"blob containers: {set(containers)}"
    assert containers["deploymentContainer"].get("name") == "deploymentContainerName"
    app_containers = containers["appContainers"]
    assert app_containers.loop is not None
    assert app_containers.loop["detail"]["array_name"] == "appContainerNames"
    assert app_containers.get("name") == app_containers.loop["detail"]["item_name"]
    names = t.default("appContainerNames")
    assert isinstance(names, list) and set(names) >= REQUIRED_CONTAINERS, f"app containers: {names}"
    for container in containers.values():
        assert container.get("properties.publicAccess") == "None", f"{container.symbol} must be private"
    # The list the role assignments are made from: every container created here, and nothing else.
    listed = call(t.outputs["blobContainerNames"]["value"], "concat")
    assert listed is not None and accessor_chain(listed["arg_1"][0]) == ["deploymentContainer", "name"]
    assert listed["arg_2"] == "appContainerNames" and len(listed) == 2
    # the webhook replay window (shared/replay.py) is cleaned up by a lifecycle rule
    (policy,) = t.resources(f"{STORAGE}/managementPolicies")
    (rule,) = policy.get("properties.policy.rules")
    assert rule["definition"]["filters"]["prefixMatch"] == ["webhook-replay/"]
    assert rule["definition"]["actions"]["baseBlob"]["delete"] == {"daysAfterModificationGreaterThan": 1}
    assert _main_source(infra, "storage", "deploymentContainerName") == "deploymentContainerName"
    deployment_value = (
        infra["functionapp"]
        .resource("Microsoft.Web/sites")
        .get("properties.functionAppConfig.deployment.storage.value")
    )
    assert deployment_value == "${blobEndpoint}${deploymentContainerName}"
    assert _from_module_output(
        infra,
        _main_source(infra, "functionapp", "deploymentContainerName"),
        "storage",
        "deploymentContainerName",
    )

    queues = t.resource(f"{STORAGE}/queueServices/queues")
    assert queues.loop is not None, "queues are declared with one loop over queueNames"
    queue_names = t.value(queues.loop["detail"]["array_name"])
    assert queue_names == ["syncQueueName", "${syncQueueName}-poison", "${syncQueueName}-deadletter"], (
        f"queues: {queue_names}"
    )
    assert queues.get("name") == queues.loop["detail"]["item_name"]
    # One main parameter feeds both the queues and the app's SYNC_QUEUE_NAME.
    assert _main_source(infra, "storage", "syncQueueName") == "syncQueueName"
    assert _main_source(infra, "functionapp", "syncQueueName") == "syncQueueName"
    assert infra.main.default("syncQueueName") == "dynamics-sync"


def storage_network(infra: Infra) -> None:
    """With the app's subnet, the account refuses every other network but the operators' addresses."""
    t = infra["storage"]
    acls = t.resource(STORAGE).get("properties.networkAcls")
    assert t.variables["restricted"] == {
        "operator": {"type": "not", "operands": {"bool_value": {
            "function": {"type": "empty", "parameters": {"item_to_test": "appSubnetId"}}}}}
    }
    assert t.default("appSubnetId") == ""
    assert acls["defaultAction"] == {
        "operator": {"type": "conditional",
                     "operands": {"condition": "restricted", "true_value": "Deny", "false_value": "Allow"}}
    }, "deny by default whenever there is an app subnet"
    assert acls["virtualNetworkRules"] == {
        "operator": {"type": "conditional", "operands": {
            "condition": "restricted", "true_value": [{"id": "appSubnetId", "action": "Allow"}],
            "false_value": []}}
    }
    assert acls["bypass"] == "None", "no trusted-service bypass: nothing outside the subnet needs data access"
    ip_rules = acls["ipRules"]["loop_type"]
    assert call(ip_rules["detail"]["array_name"], "filter") is not None, "blank entries are dropped"
    assert "allowedIpAddresses" in identifiers(ip_rules["detail"]["array_name"])
    # Storage rejects /31 and /32 ranges: a /32 is sent as the bare address
    assert call(acls["ipRules"]["config"]["value"], "replace") == {
        "original_string": {"function": {"type": "trim",
                                         "parameters": {"string_to_trim": ip_rules["detail"]["item_name"]}}},
        "old_string": "/32",
        "new_string": "",
    }
    assert t.default("allowedIpAddresses") == []
    # main.bicep: the subnet whenever the app has one; the operators' addresses from their own parameter.
    network = infra.module_symbol("network")
    source = _main_source(infra, "storage", "appSubnetId")
    assert {"vnetIntegration", network} <= identifiers(source), "storage must admit the app subnet"
    assert _main_source(infra, "storage", "allowedIpAddresses") == "storageAllowedIpAddresses"
    assert infra.main.default("storageAllowedIpAddresses") == []


def key_vault(infra: Infra) -> None:
    t = infra["keyvault"]
    vault = t.resource(VAULT)
    assert vault.get("properties.enableRbacAuthorization") is True, "RBAC authorization, no access policies"
    assert vault.get("properties.enableSoftDelete") is True
    assert vault.get("properties.softDeleteRetentionInDays") == 90
    assert vault.get("properties.enablePurgeProtection") is True
    assert vault.get("properties.accessPolicies") is None
    acls = vault.get("properties.networkAcls")
    assert acls["bypass"] == "AzureServices"
    assert acls["defaultAction"] == "networkDefaultAction", "the firewall's default is a parameter"
    assert set(t.allowed("networkDefaultAction") or []) == {"Deny", "Allow"}
    assert t.default("networkDefaultAction") == "Deny"
    assert "allowedIpAddresses" in identifiers(acls["ipRules"])
    # KEY_VAULT_ALLOWED_IPS="1.2.3.4, 5.6.7.8" and a trailing comma must not become invalid rules.
    ip_rules = acls["ipRules"]["loop_type"]
    assert ip_rules["detail"]["array_name"]["function"]["type"] == "filter", "empty entries are dropped"
    assert "trim" in str(ip_rules["detail"]["array_name"]), "blank entries are dropped"
    assert call(acls["ipRules"]["config"]["value"], "trim") == {
        "string_to_trim": ip_rules["detail"]["item_name"]
    }
    assert "appSubnetId" in identifiers(acls["virtualNetworkRules"])
    assert _main_source(infra, "keyvault", "networkDefaultAction") == "keyVaultNetworkDefaultAction"
    assert infra.main.default("keyVaultNetworkDefaultAction") == "Deny", "deny by default"

    secrets = t.resources(f"{VAULT}/secrets")
    assert {s.get("name") for s in secrets} == {"clientSecretName", "webhookSecretName", "messageSecretName"}
    for secret in secrets:
        value = secret.get("properties.value")
        assert isinstance(value, str) and value in t.parameters and t.is_secure(value), (
            f"{secret.symbol}: its value must come straight from a @secure() parameter"
        )
        assert secret.condition is not None and value in identifiers(secret.condition), (
            f"{secret.symbol} must be written only when {value} is given"
        )
        assert t.default(value) == "", f"{value} must be optional"
    for name in ("dataverseClientSecret", "webhookSigningSecret", "messageSigningSecret"):
        assert infra.main.is_secure(name) and infra.main.default(name) == ""
        assert _main_source(infra, "keyvault", name) == name


def virtual_network(infra: Infra) -> None:
    """A vault that denies by default must still admit the app: through its subnet's service endpoint."""
    main = infra.main
    assert main.variables["vnetIntegration"] == {
        "operator": {
            "type": "equals",
            "operands": {"operand_1": "keyVaultNetworkDefaultAction", "operand_2": "Deny"},
        }
    }
    network = infra.module_symbol("network")
    assert main.modules[network]["config"].get("condition") == "vnetIntegration"
    vnet = infra["network"].resource("Microsoft.Network/virtualNetworks")
    (subnet,) = vnet.get("properties.subnets")
    props = subnet["properties"]
    assert [d["properties"]["serviceName"] for d in props["delegations"]] == ["Microsoft.App/environments"]
    assert [e["service"] for e in props["serviceEndpoints"]] == ["Microsoft.KeyVault", "Microsoft.Storage"]
    for module in ("keyvault", "storage", "functionapp"):
        source = _main_source(infra, module, "appSubnetId")
        assert "vnetIntegration" in identifiers(source) and network in identifiers(source), (
            f"{module}.bicep must get the app subnet when the vault denies by default"
        )
    site = infra["functionapp"].resource("Microsoft.Web/sites")
    assert "appSubnetId" in identifiers(site.get("properties.virtualNetworkSubnetId"))


def monitoring(infra: Infra) -> None:
    t = infra["monitoring"]
    workspace = t.resource("Microsoft.OperationalInsights/workspaces")
    insights = t.resource(APP_INSIGHTS)
    assert insights.get("properties.DisableLocalAuth") is True, "App Insights must accept Entra auth only"
    assert accessor_chain(insights.get("properties.WorkspaceResourceId")) == [workspace.symbol, "id"]
    assert insights.get("properties.Application_Type") == "web"


def function_app(infra: Infra) -> None:
    t = infra["functionapp"]
    plan = t.resource("Microsoft.Web/serverfarms")
    assert plan.get("sku") == {"name": "FC1", "tier": "FlexConsumption"}, "Flex Consumption plan"
    assert plan.get("properties.reserved") is True, "Linux"

    site = t.resource("Microsoft.Web/sites")
    assert site.get("kind") == "functionapp,linux"
    assert site.get("properties.serverFarmId") == {
        "operator": {"type": "property_accessor", "operands": {"operand_1": plan.symbol, "operand_2": "id"}}
    }
    assert site.get("properties.httpsOnly") is True, "HTTPS only"
    assert site.get("properties.siteConfig.minTlsVersion") == "1.2", "minimum TLS 1.2"
    site_config = site.get("properties.siteConfig")
    rejected = {k for k in site_config if k.lower() in {p.lower() for p in FLEX_REJECTED_SITE_CONFIG}}
    assert not rejected, f"Flex Consumption rejects siteConfig {sorted(rejected)} (ARM error 51021)"
    rejected = {
        k for k in site.get("properties") if k.lower() in {p.lower() for p in FLEX_REJECTED_SITE_PROPERTIES}
    }
    assert not rejected, f"not valid on a Flex Consumption site: {sorted(rejected)}"
    assert site.get("properties.siteConfig.remoteDebuggingEnabled") is False, "remote debugging off"
    assert site.get("properties.siteConfig.http20Enabled") is True, "HTTP/2 on"

    identity = site.get("identity")
    assert identity["type"] == "UserAssigned"
    assert [_key(k) for k in identity["userAssignedIdentities"]] == ["${identityId}"]
    assert _from_module_output(infra, _main_source(infra, "functionapp", "identityId"), "identity", "id")

    config = site.get("properties.functionAppConfig")
    storage = config["deployment"]["storage"]
    assert storage["type"] == "blobContainer"
    assert storage["authentication"] == {
        "type": "UserAssignedIdentity",
        "userAssignedIdentityResourceId": "identityId",
    }
    assert config["runtime"] == {"name": "python", "version": "3.11"}
    assert config["scaleAndConcurrency"] == {
        "instanceMemoryMB": "instanceMemoryMB",
        "maximumInstanceCount": "maximumInstanceCount",
    }

    tags = call(site.get("tags"), "union")
    assert tags is not None and {_key(k): v for k, v in tags["arg_2"].items()} == {"azd-service-name": "api"}
    assert "tags" in identifiers(tags["arg_1"]), "the azd-env-name tag too"
    assert infra.main.variables["tags"] == {"'azd-env-name'": "environmentName"}

    # The app starts once its roles exist (the identity itself is a separate, earlier module).
    depends = infra.main.modules[infra.module_symbol("functionapp")]["config"].get("dependsOn") or []
    assert infra.module_symbol("rbac") in depends, "the function app must wait for the role assignments"


def app_settings_of(infra: Infra) -> dict[str, object]:
    t = infra["functionapp"]
    assert not t.resources("Microsoft.Web/sites/config"), "app settings live in siteConfig.appSettings only"
    entries = t.resource("Microsoft.Web/sites").get("properties.siteConfig.appSettings")
    assert isinstance(entries, list)
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), f"duplicate app settings: {names}"
    return {entry["name"]: entry["value"] for entry in entries}


def app_settings(infra: Infra) -> None:
    settings = app_settings_of(infra)
    declared = {spec.name for spec in SETTINGS}
    missing = declared - LEFT_UNSET - set(settings)
    assert not missing, f"settings the code reads but infra does not set: {sorted(missing)}"
    forbidden = set(settings) & FORBIDDEN_SETTINGS
    assert not forbidden, f"not allowed on Flex Consumption / shared-key: {sorted(forbidden)}"
    assert not (set(settings) & LEFT_UNSET), "AZURE_AUTHORITY_HOST stays unset in public cloud"
    unknown = set(settings) - declared - HOST_SETTINGS
    assert not unknown, f"app settings nobody reads (typo?): {sorted(unknown)}"

    assert settings["AZURE_CLIENT_ID"] == "identityClientId", "azure-identity must pick the app's identity"
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    assert settings["AzureWebJobsStorage__clientId"] == "identityClientId"
    for service in ("blob", "queue", "table"):
        assert settings[f"AzureWebJobsStorage__{service}ServiceUri"] == f"{service}Endpoint"
        assert _from_module_output(
            infra, _main_source(infra, "functionapp", f"{service}Endpoint"), "storage", f"{service}Endpoint"
        )
    assert (
        settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"]
        == "Authorization=AAD;ClientId=${identityClientId}"
    )
    assert _from_module_output(
        infra,
        _main_source(infra, "functionapp", "applicationInsightsConnectionString"),
        "monitoring",
        "connectionString",
    )
    assert _from_module_output(
        infra, _main_source(infra, "functionapp", "identityClientId"), "identity", "clientId"
    )
    assert settings["KEY_VAULT_URL"] == "keyVaultUrl"
    assert _from_module_output(infra, _main_source(infra, "functionapp", "keyVaultUrl"), "keyvault", "uri")


def settings_defaults(infra: Infra) -> None:
    """Each setting that main.bicep exposes as a parameter has the code's default (or is required)."""
    settings = app_settings_of(infra)
    functionapp = infra["functionapp"]
    traced = set()
    for spec in SETTINGS:
        value = settings.get(spec.name)
        if not (isinstance(value, str) and value in functionapp.parameters):
            continue
        source = _main_source(infra, "functionapp", value)
        if not (isinstance(source, str) and source in infra.main.parameters):
            continue
        traced.add(spec.name)
        default = infra.main.default(source)
        if spec.default is None:
            assert default is None, (
                f"{spec.name} is required by the code, so main.bicep's {source} must be too"
            )
        else:
            assert str(default) == spec.default, (
                f"{spec.name}: main.bicep's {source} defaults to {default!r}, the code to {spec.default!r}"
            )
    required = {"DATAVERSE_URL", "DATAVERSE_TENANT_ID", "DATAVERSE_CLIENT_ID"}
    assert required <= traced, f"required parameters of main.bicep: {sorted(required - traced)}"


def role_assignments(infra: Infra) -> None:
    t = infra["rbac"]
    app_roles: set[tuple[str, str]] = set()
    deployer_roles: set[tuple[str, str]] = set()
    for assignment in t.resources("Microsoft.Authorization/roleAssignments"):
        where = f"rbac.bicep {assignment.symbol}"
        definition = call(assignment.get("properties.roleDefinitionId"), "subscription_resource_id")
        assert definition is not None, f"{where}: roleDefinitionId must be subscriptionResourceId(...)"
        assert definition["resource_type"] == "Microsoft.Authorization/roleDefinitions"
        role = t.value(definition["resource_name_1"])
        scope_expr = assignment.get("scope")
        name = call(assignment.get("name"), "guid")
        assert name is not None, f"{where}: name must be guid(scope, principal, role)"
        parts = list(name.values())
        if isinstance(scope_expr, str):
            scope_symbol = scope_expr
            assert accessor_chain(parts[0]) == [scope_symbol, "id"], (
                f"{where}: guid must start with the scope's id"
            )
        else:
            # [for i in range(0, length(list))]: one assignment per element of a resource loop over list
            scope_symbol = _looped_scope(t, assignment, scope_expr, parts[0], where)
        assert scope_symbol, f"{where}: scope must be one resource, not the resource group"
        scope = t.symbol(scope_symbol)
        principal = assignment.get("properties.principalId")
        assert parts[1:] == [principal, definition["resource_name_1"]], (
            f"{where}: guid(scope, principal, role)"
        )
        if principal == "identityPrincipalId":
            assert assignment.get("properties.principalType") == "ServicePrincipal", where
            assert assignment.condition is None, f"{where}: the app's roles are unconditional"
            app_roles.add((str(role), scope.type))
        elif principal == "deployerPrincipalId":
            assert assignment.get("properties.principalType") == "deployerPrincipalType", where
            assert "deployerPrincipalId" in identifiers(assignment.condition), (
                f"{where}: only when a deployer principal is given"
            )
            deployer_roles.add((str(role), scope.type))
            if role == ROLES["Key Vault Certificates Officer"]:
                assert _and_terms(assignment.condition)[0] == {
                    "operator": {"type": "equals",
                                 "operands": {"operand_1": "dataverseCredential", "operand_2": "certificate"}}
                }, f"{where}: only in certificate mode"
        else:
            raise AssertionError(f"{where}: unexpected principal {principal!r}")
    assert app_roles == APP_IDENTITY_ROLES, (
        f"app identity roles: extra {app_roles - APP_IDENTITY_ROLES}, "
        f"missing {APP_IDENTITY_ROLES - app_roles}"
    )
    assert deployer_roles == DEPLOYER_ROLES, (
        f"deployer roles: extra {deployer_roles - DEPLOYER_ROLES}, missing {DEPLOYER_ROLES - deployer_roles}"
    )

    assert _from_module_output(
        infra, _main_source(infra, "rbac", "identityPrincipalId"), "identity", "principalId"
    )
    assert _main_source(infra, "rbac", "deployerPrincipalId") == "principalId"
    assert infra.main.default("principalId") == ""
    assert _main_source(infra, "rbac", "deployerPrincipalType") == "principalType"
    assert _main_source(infra, "rbac", "dataverseCredential") == "dataverseCredential"
    assert infra.main.default("principalType") == "User"
    for param, module, output in (
        ("storageAccountName", "storage", "name"),
        ("blobContainerNames", "storage", "blobContainerNames"),
        ("keyVaultName", "keyvault", "name"),
        ("applicationInsightsName", "monitoring", "applicationInsightsName"),
    ):
        assert _from_module_output(infra, _main_source(infra, "rbac", param), module, output)
    for type_, param in (
        (STORAGE, "storageAccountName"),
        (VAULT, "keyVaultName"),
        (APP_INSIGHTS, "applicationInsightsName"),
    ):
        (existing,) = [r for r in t.resources(type_) if r.existing]
        assert existing.get("name") == param
    (containers,) = [r for r in t.resources(CONTAINER) if r.existing]
    assert containers.loop is not None and containers.loop["detail"]["array_name"] == "blobContainerNames"
    assert containers.get("name") == containers.loop["detail"]["item_name"]
    assert t.symbol(t.symbol(containers.get("parent")).get("parent")).type == STORAGE


def _and_terms(condition: object) -> list[object]:
    """The operands of ``a && b`` (one term when it is not an and)."""
    operator = condition.get("operator") if isinstance(condition, Mapping) else None
    if isinstance(operator, Mapping) and operator.get("type") == "and":
        return [operator["operands"]["operand_1"], operator["operands"]["operand_2"]]
    return [condition]


def _looped_scope(t: Template, assignment: Any, scope: object, guid_base: object, where: str) -> str:
    """``scope: containers[i]`` in ``[for i in range(0, length(names))]``; ``containers`` loops ``names``."""
    index = scope.get("operator") if isinstance(scope, Mapping) else None
    assert isinstance(index, Mapping) and index.get("type") == "index_accessor", f"{where}: scope {scope!r}"
    symbol, item = index["operands"]["operand_1"], index["operands"]["operand_2"]
    loop = assignment.loop
    assert loop is not None and loop["detail"]["item_name"] == item, f"{where}: scope indexed by its loop"
    over = call(loop["detail"]["array_name"], "range")
    assert over is not None and over["start_index"] == 0, f"{where}: loop over range(0, length(...))"
    counted = call(over["count"], "length")
    target = t.symbol(symbol)
    assert target.loop is not None and counted == {"arg_1": target.loop["detail"]["array_name"]}, (
        f"{where}: one assignment per {symbol}, no more and no fewer"
    )
    base = guid_base.get("operator") if isinstance(guid_base, Mapping) else None
    assert isinstance(base, Mapping) and base["operands"] == {"operand_1": scope, "operand_2": "id"}, (
        f"{where}: guid must start with the scope's id"
    )
    return str(symbol)


def diagnostics(infra: Infra) -> None:
    def logs_to_workspace(template: Template, scope: str) -> list[Mapping[str, Any]]:
        found = [
            d for d in template.resources("Microsoft.Insights/diagnosticSettings") if d.get("scope") == scope
        ]
        assert len(found) == 1, f"{template.name}: one diagnostic setting on {scope}"
        (setting,) = found
        assert setting.get("properties.workspaceId") == "workspaceId"
        assert _from_module_output(
            infra, _main_source(infra, template.name, "workspaceId"), "monitoring", "workspaceId"
        )
        logs = template.value(setting.get("properties.logs"))
        assert isinstance(logs, list)
        return [log for log in logs if log.get("enabled") is True]

    vault = infra["keyvault"].resource(VAULT).symbol
    assert any(log.get("categoryGroup") == "audit" for log in logs_to_workspace(infra["keyvault"], vault)), (
        "Key Vault audit log"
    )
    app = infra["functionapp"].resource("Microsoft.Web/sites").symbol
    assert any(
        log.get("category") == "FunctionAppLogs" for log in logs_to_workspace(infra["functionapp"], app)
    )
    queues = infra["storage"].resource(f"{STORAGE}/queueServices").symbol
    categories = {log.get("category") for log in logs_to_workspace(infra["storage"], queues)}
    assert {"StorageRead", "StorageWrite", "StorageDelete"} <= categories, "queue request logging"


def secrets_stay_in_key_vault(infra: Infra) -> None:
    """No @secure() parameter reaches an output, an app setting or any resource but a vault secret."""
    problems = []
    for t in infra:
        tainted = {name for name in t.parameters if t.is_secure(name)}
        changed = True
        while changed:
            changed = False
            for name, value in t.variables.items():
                if name not in tainted and identifiers(value) & tainted:
                    tainted.add(name)
                    changed = True
        for name, output in t.outputs.items():
            if identifiers(output["value"]) & tainted:
                problems.append(
                    f"{t.name}.bicep: output {name} carries {identifiers(output['value']) & tainted}"
                )
        for symbol in t.modules:
            child = infra[Path(t.module_path(symbol)).stem]
            for param, expr in t.module_params(symbol).items():
                if identifiers(expr) & tainted and not child.is_secure(param):
                    problems.append(
                        f"{t.name}.bicep: a secret flows into {child.name}.bicep's "
                        f"non-secure parameter {param}"
                    )
        for resource in t.resources():
            body: dict[str, Any] = dict(resource.body)
            if resource.type.lower() == f"{VAULT}/secrets".lower():
                body["properties"] = {k: v for k, v in body["properties"].items() if k != "value"}
            leaked = identifiers(body) & tainted
            if leaked:
                problems.append(f"{t.name}.bicep: resource {resource.symbol} uses {sorted(leaked)}")
    assert not problems, "\n".join(problems)


def outputs_for_azd(infra: Infra) -> None:
    outputs = infra.main.outputs
    for name in (
        "AZURE_LOCATION",
        "AZURE_TENANT_ID",
        "AZURE_FUNCTION_APP_NAME",
        "SERVICE_API_NAME",
        "SERVICE_API_URI",
        "KEY_VAULT_URL",
        "AZURE_KEY_VAULT_NAME",
        "AZURE_STORAGE_ACCOUNT_NAME",
    ):
        assert name in outputs, f"main.bicep must output {name}"
    assert _from_module_output(infra, outputs["SERVICE_API_NAME"]["value"], "functionapp", "name")
    assert _from_module_output(infra, outputs["KEY_VAULT_URL"]["value"], "keyvault", "uri")
    assert infra.main.json["globals"]["scope"]["value"] == "resourceGroup"


def _equals(expr: object, left: str, right: str) -> bool:
    """``expr`` is, or contains, the comparison ``left == right`` (pycep's tree)."""
    if isinstance(expr, Mapping):
        op = expr.get("operator")
        if isinstance(op, Mapping) and op.get("type") == "equals":
            operands = op.get("operands") or {}
            if {operands.get("operand_1"), operands.get("operand_2")} == {left, right}:
                return True
        return any(_equals(v, left, right) for v in expr.values())
    if isinstance(expr, list):
        return any(_equals(v, left, right) for v in expr)
    return False


GRAPH_FIC = "Microsoft.Graph/applications/federatedIdentityCredentials"


def credential_modes(infra: Infra) -> None:
    """DATAVERSE_CREDENTIAL is a parameter; no client secret outside the secret mode; the federated
    credential trusts exactly the app's identity (Graph Bicep extension), else the az command is output."""
    main = infra.main
    assert set(main.allowed("dataverseCredential") or []) == {"secret", "federated", "certificate"}
    assert main.default("dataverseCredential") == "secret", "today's behaviour stays the default"
    assert app_settings_of(infra)["DATAVERSE_CREDENTIAL"] == "dataverseCredential"
    assert _main_source(infra, "functionapp", "dataverseCredential") == "dataverseCredential"

    # No Key Vault secret for the client secret unless the mode is `secret`.
    vault = infra["keyvault"]
    assert _main_source(infra, "keyvault", "dataverseCredential") == "dataverseCredential"
    secrets = vault.resources(f"{VAULT}/secrets")
    client_secret = next(r for r in secrets if r.get("name") == "clientSecretName")
    assert _equals(client_secret.condition, "dataverseCredential", "secret"), (
        "the client secret must be written only when dataverseCredential is secret"
    )

    # federated, with the app's uniqueName: the Graph extension adds the federated credential.
    symbol = infra.module_symbol("federated-credential")
    module = main.modules[symbol]
    condition = module["config"].get("condition")
    assert _equals(condition, "dataverseCredential", "federated"), "deployed in federated mode only"
    assert "dataverseAppUniqueName" in identifiers(condition), "deployed only when the app can be addressed"
    assert main.default("dataverseAppUniqueName") == "", "opt-in: Graph permissions are not everyone's"
    params = main.module_params(symbol)
    assert params["appUniqueName"] == "dataverseAppUniqueName"
    assert _from_module_output(infra, params["identityPrincipalId"], "identity", "principalId"), (
        "the subject is the principal (object) id of the app's user-assigned identity"
    )
    graph = infra["federated-credential"]
    assert "microsoftGraphV1" in (graph.json.get("extensions") or {}), "extension microsoftGraphV1"
    fic = graph.resource(GRAPH_FIC)
    assert fic.api_version == "v1.0"
    assert fic.get("audiences") == ["api://AzureADTokenExchange"]
    assert fic.get("subject") == "identityPrincipalId"
    issuer = fic.get("issuer")
    assert issuer == "${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0", (
        f"issuer must be the tenant's v2.0 issuer, got {issuer!r}"
    )
    app = graph.symbol("app")
    assert app.existing and app.get("uniqueName") == "appUniqueName", (
        "the existing app registration, never a new one"
    )
    config = infra.root / "bicepconfig.json"
    assert config.is_file(), "infra/bicepconfig.json names the extension's registry"
    extensions = json.loads(config.read_text())["extensions"]
    registry = "br:mcr.microsoft.com/bicep/extensions/microsoftgraph/v1.0:"
    assert extensions["microsoftGraphV1"].startswith(registry)

    # federated without it: the exact command, with the same issuer/subject/audience, is an output.
    command = main.outputs["FEDERATED_CREDENTIAL_COMMAND"]["value"]
    assert _equals(command, "dataverseCredential", "federated")
    text = str(command).replace("\\", "")
    for part in ("az ad app federated-credential create --id ${dataverseClientId} --parameters '{",
                 '"issuer":"${federatedIssuer}"', '"subject":"${identity.outputs.principalId}"',
                 '"audiences":["api://AzureADTokenExchange"]'):
        assert part in text, f"FEDERATED_CREDENTIAL_COMMAND lacks {part}"
    assert main.variables["federatedIssuer"] == issuer


# Threads beyond the queue trigger's concurrency: HTTP requests and the reconciliation timer.
HTTP_HEADROOM_THREADS = 4


def worker_threads(infra: Infra) -> None:
    """Every invocation the host dispatches gets a worker thread at once.

    functionTimeout counts from dispatch; a job's deadline (shared.deadline) from the moment a Python
    worker thread runs it.  With fewer threads than the queue concurrency (batchSize + newBatchThreshold
    per instance) invocations queue inside the worker, the deadline starts late and a job can outlive
    functionTimeout (the host gives up on it and the message is redelivered while it still runs).
    """
    queues = json.loads((infra.root.parent / "host.json").read_text())["extensions"]["queues"]
    concurrency = int(queues["batchSize"]) + int(queues["newBatchThreshold"])
    value = app_settings_of(infra).get("PYTHON_THREADPOOL_THREAD_COUNT")
    assert isinstance(value, str) and value.isdigit(), "PYTHON_THREADPOOL_THREAD_COUNT: a literal count"
    assert int(value) >= concurrency + HTTP_HEADROOM_THREADS, (
        f"PYTHON_THREADPOOL_THREAD_COUNT {value} < queue concurrency {concurrency} + {HTTP_HEADROOM_THREADS}"
    )
    # the local host runs with the same pool (local.settings.example.json, devstack's demo settings)
    example = json.loads((infra.root.parent / "local.settings.example.json").read_text())["Values"]
    assert example.get("PYTHON_THREADPOOL_THREAD_COUNT") == value, "local.settings.example.json differs"


ALL: dict[str, Callable[[Infra], None]] = {
    "storage": storage,
    "storage_network": storage_network,
    "key_vault": key_vault,
    "virtual_network": virtual_network,
    "monitoring": monitoring,
    "function_app": function_app,
    "app_settings": app_settings,
    "settings_defaults": settings_defaults,
    "role_assignments": role_assignments,
    "diagnostics": diagnostics,
    "secrets_stay_in_key_vault": secrets_stay_in_key_vault,
    "outputs_for_azd": outputs_for_azd,
    "credential_modes": credential_modes,
    "worker_threads": worker_threads,
}
